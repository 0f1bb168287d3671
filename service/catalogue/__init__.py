"""The catalogue: importing it, and curators' decisions on it."""
