"""The HTTP edge: routers translate domain errors into status codes with actionable messages."""
