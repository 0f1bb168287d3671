"""Who may do what: API keys and roles, and what a key may read."""
