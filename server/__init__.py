"""The victim API: FastAPI app factory, settings, routes, auth, Redis accounting, model registry."""

__version__ = "0.1.0"
