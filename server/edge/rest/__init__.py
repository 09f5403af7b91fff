"""The KServe v2 REST edge and the model page, beside gRPC on the same core."""
