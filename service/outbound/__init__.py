"""Requests to partners' servers: photo fetches, callbacks, and their deadline."""
