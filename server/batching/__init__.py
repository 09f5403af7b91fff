"""Dynamic batching: the bounded queue, the batcher and its statistics.

It runs whatever function it is given, so it knows nothing of models or
onnxruntime.
"""
