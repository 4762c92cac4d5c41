"""The OpenAI-compatible HTTP server over the scheduler: ``create_app`` (FastAPI) and ``serve`` (uvicorn)."""

from .app import create_app

__all__ = ["create_app"]
