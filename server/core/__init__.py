"""The data and control planes, without gRPC: inference, model control, descriptions, decoding.

Everything a servicer calls lives here, so a test can call it directly; it
works on the loaded models of the layer below.
"""
