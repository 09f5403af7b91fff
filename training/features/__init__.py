"""Stage 3, features: frozen-backbone embeddings, computed fast (onnxruntime) and cached on disk."""
