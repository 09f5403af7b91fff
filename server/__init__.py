"""tlserve server: KServe v2 + tlserve.v1 over grpc.aio, with dynamic batching."""
