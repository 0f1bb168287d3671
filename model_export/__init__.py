"""Keras -> ONNX export (the ``export`` extra): the embedding sub-model, the ``whaleid.*``
metadata, and the TF-vs-ONNX-vs-service parity check that must pass before a file is written."""
