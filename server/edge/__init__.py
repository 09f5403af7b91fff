"""The gRPC edge: building the server, servicers, interceptors, status codes, streams, security.

The top layer of the server. It turns each call into a plain method call on
the core and the result or error back into gRPC; the layers below it never
import ``grpc``.
"""
