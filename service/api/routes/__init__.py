"""The routers, one module per group of paths; app.py includes them all."""
