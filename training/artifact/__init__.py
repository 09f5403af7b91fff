"""Stage 6, artifact: export to ONNX, verify, build the faster variants and publish atomically."""
