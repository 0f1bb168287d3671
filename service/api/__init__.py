"""The HTTP edge: the app (app.py), its middleware, the error table (errors.py) and the schemas;
the routers are in routes/."""
