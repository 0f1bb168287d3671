"""The gallery: the faiss index, its sync with the database, and embedding into it."""
