"""The object store (local or S3) and the photos, rows and retention kept in it."""
