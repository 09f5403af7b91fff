"""Dynamic batching: the bounded queue, its speed estimate, the batcher and its statistics.

It runs whatever function it is given, so it knows nothing of models or
onnxruntime.
"""
