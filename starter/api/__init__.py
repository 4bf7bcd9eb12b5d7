"""The HTTP API layer: FastAPI routes that start and read generation workflows."""

from starter.api.app import create_app, main

__all__ = ["create_app", "main"]
