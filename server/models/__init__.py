"""What is loaded and how: the registry, the repository on disk, variants, tuning, sessions.

A model version is found, its file chosen, loaded into onnxruntime, tuned and
given a batcher here, before it serves.
"""
