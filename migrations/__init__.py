"""Alembic environment and versions of the whaleid schema."""
