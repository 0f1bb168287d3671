"""The ONNX model: its registered file and its runtime session (the embedder)."""
