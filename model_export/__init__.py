"""Keras -> ONNX export (the `export` extra). Built in a later issue."""
