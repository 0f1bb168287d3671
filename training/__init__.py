"""Training of the embedding model (the `train` extra). Built in a later issue."""
