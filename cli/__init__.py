"""``kdcache``: the command line. ``common`` holds the root group and ``main``; importing the
command modules registers their commands on it. Every module here is light: heavy libraries
load inside the command that runs."""
from . import bench, evaluate, pipeline, stores  # noqa: F401 - registers the commands
from .common import cli, main

__all__ = ["cli", "main"]
