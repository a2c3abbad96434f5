"""Ray Serve application hosting the edge models (see serve/app.py and serve/config.yaml)."""
