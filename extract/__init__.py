"""Extraction: corpus -> decoded views -> teachers -> store shards.

Public face: ``extract`` (the run) and its ``ExtractOptions``. Corpora, decoding and views
live in ``kdcache.data``; teachers in ``kdcache.models``.
"""
from .run import ExtractError, ExtractOptions, ExtractSummary, extract

__all__ = ["ExtractError", "ExtractOptions", "ExtractSummary", "extract"]
