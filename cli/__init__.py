"""``kdcache``: the command line. ``common`` holds the root group and ``main``; importing the
command modules registers their commands on it."""
from . import evaluate, pipeline, stores  # noqa: F401 - registers the commands
from .common import cli, main

__all__ = ["cli", "main"]
