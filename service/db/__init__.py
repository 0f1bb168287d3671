"""The database: its tables, the checks on what is written, and the migrations."""
