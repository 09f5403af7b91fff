"""The contract every side of tlserve shares: training, server and client.

The lightest package: numpy, Pillow, protobuf messages and ``grpc.StatusCode``,
never a gRPC server, onnxruntime or torch. Client, server and training import
it; it imports none of them (docs/architecture.md has the whole import rule).

- :mod:`~tlserve.contract.errors`: the error tree, each error with its status code;
- :mod:`~tlserve.contract.codec`: numpy arrays <-> Open Inference Protocol tensors;
- :mod:`~tlserve.contract.card`: the model card a model carries (labels, preprocessing);
- :mod:`~tlserve.contract.images`: decode, resize and crop, one geometry for all;
- :mod:`~tlserve.contract.predictions`: a ranked label and the one top-k;
- :mod:`~tlserve.contract.rules`: file layout, tensor names, model names, limits.
"""
