"""The real model, engine and servers of tests/servers.py, as fixtures of this tier."""

from tests.servers import engine, live, model_path

__all__ = ["engine", "live", "model_path"]
