"""tlserve server: KServe v2 + tlserve.v1 over grpc.aio, with dynamic batching.

Layers, each importing only those below it (tests/test_architecture.py):
``edge`` (gRPC) -> ``core`` (data and control planes) -> ``models`` (what
is loaded and how) -> ``batching`` -> the shared base at this level
(``config``, ``policy``, ``metrics``).
"""
