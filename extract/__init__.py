"""Extraction: corpus -> decoded views -> teachers -> store shards.

Public face: ``extract`` (the run), ``create_teacher``, ``resolve_corpus``, ``verify``.
"""
from .corpus import Corpus, CorpusError, resolve_corpus
from .run import ExtractError, ExtractOptions, ExtractSummary, extract
from .teacher import Teacher, TeacherError, TeacherSpec, create_teacher

__all__ = ["Corpus", "CorpusError", "ExtractError", "ExtractOptions", "ExtractSummary", "Teacher", "TeacherError",
           "TeacherSpec", "create_teacher", "extract", "resolve_corpus"]
