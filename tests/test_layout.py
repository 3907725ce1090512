"""The layout's promises, checked on the source: train/ never imports extract/; only store/ knows
the store's paths and its zarr root; nothing unpickles."""
from __future__ import annotations

import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("data", "models", "extract", "quantize", "store", "train", "eval", "cli")


def _sources(*packages):
    for pkg in packages:
        for dirpath, _, files in os.walk(os.path.join(ROOT, pkg)):
            for f in files:
                if f.endswith(".py"):
                    path = os.path.join(dirpath, f)
                    yield os.path.relpath(path, ROOT), open(path, encoding="utf-8").read()
    for f in ("demo.py",):
        if packages == PACKAGES:
            yield f, open(os.path.join(ROOT, f), encoding="utf-8").read()


def test_train_never_imports_extract_and_store_imports_nothing_of_ours():
    for path, text in _sources("train"):
        assert not re.search(r"(from|import) kdcache\.extract", text), path
    for path, text in _sources("store"):
        assert not re.search(r"(from|import) kdcache\.(?!store)", text), path


def test_only_store_knows_the_store_paths_and_root():
    outside = [p for p in PACKAGES if p != "store"]
    for path, text in _sources(*outside):
        assert not re.search(r"\.root\b", text), path
        assert not re.search(r"[\"'f](shards|stats|quantizers)/", text), path


# torch.load only with weights_only=True; safetensors.torch.load (tensors from bytes, no pickle) is not torch.load
@pytest.mark.parametrize("pattern", [r"import pickle", r"pickle\.", r"(?<!safetensors\.)torch\.load\(", r"(^|[^.\w])eval\("])
def test_nothing_unpickles_or_evaluates(pattern):
    for path, text in _sources(*PACKAGES):
        for line in text.splitlines():
            if re.search(pattern, line) and not ("torch" in pattern and "weights_only=True" in line):
                raise AssertionError(f"{path}: {line.strip()}")
