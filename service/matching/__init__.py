"""Answering a photo: the identification, encounters, and the work slots."""
