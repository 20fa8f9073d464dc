"""Serving: an OpenAI-compatible HTTP server with continuous batching (`vlm serve`)."""

from vlmspec.runtime.serve.app import ServeConfig, create_app

__all__ = ["ServeConfig", "create_app"]
