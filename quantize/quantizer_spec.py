"""A quantizer as the command line names it: ``METHOD[:M=48,beam=8,...]``, validated.

Light on purpose (no faiss): the command line reads its defaults for ``--help``, and extraction
checks ``--quantize`` before any model is built. The methods themselves are in ``methods``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from kdcache.errors import KdcacheError

METHODS = ("pq", "opq", "pca", "rq", "sq8", "sq4")  # the methods ``methods.fit`` trains, in help order


class QuantizeError(KdcacheError):
    pass


@dataclass(frozen=True)
class QuantizerSpec:
    """``METHOD[:M=48,beam=8,...]`` as the CLI takes it. M is bytes per token (codebooks)."""

    method: str
    m: int | None = None
    beam: int = 4  # rq: beam width when encoding (8 gains ~0.002 cosine at half the speed)
    train_beam: int = 1  # rq: beam width while training (cost grows with it; greedy + refinement is cheap)
    niter: int = 25  # k-means iterations
    opq_iter: int = 50  # opq: alternations of rotation and PQ
    refine: int = 0  # rq: rounds of (beam encode, joint least-squares codebook update) after greedy training
    norm: int = 0  # 1 = gain-shape: one of the M bytes codes |x|, the M-1 codebooks code x / |x|

    def __post_init__(self):
        if self.method not in METHODS:
            raise QuantizeError(f"quantizer method {self.method!r}: expected one of {', '.join(METHODS)}")
        lows = {"beam": 1, "train_beam": 1, "niter": 1, "opq_iter": 1, "refine": 0}
        for name, low in lows.items():
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise QuantizeError(f"quantizer {self.method}: {name}={v!r}, need an integer >= {low}")
        if self.m is not None and (not isinstance(self.m, int) or isinstance(self.m, bool) or not 1 <= self.m <= 4096):
            raise QuantizeError(f"quantizer {self.method}: M={self.m!r}, need an integer in 1..4096")
        if self.norm not in (0, 1):
            raise QuantizeError(f"quantizer {self.method}: norm must be 0 or 1")

    @classmethod
    def parse(cls, text: str) -> "QuantizerSpec":
        method, _, rest = text.partition(":")
        method = method.strip().lower()
        if method not in METHODS:
            raise QuantizeError(f"quantizer {text!r}: method must be one of {', '.join(METHODS)}")
        kw = {}
        for item in filter(None, (p.strip() for p in rest.split(","))):
            k, eq, v = item.partition("=")
            if not eq or not v.strip().isdigit():
                raise QuantizeError(f"quantizer {text!r}: {item!r} is not key=integer")
            kw[k.strip().lower()] = int(v)
        unknown = set(kw) - {"m", "beam", "train_beam", "niter", "opq_iter", "refine", "norm"}
        if unknown:
            raise QuantizeError(f"quantizer {text!r}: unknown key(s) {', '.join(sorted(unknown))} "
                                f"(m, beam, train_beam, niter, opq_iter, refine, norm)")
        if kw.get("norm", 0) not in (0, 1):
            raise QuantizeError(f"quantizer {text!r}: norm must be 0 or 1")
        return cls(method=method, **kw)

    def resolve_m(self, dim: int) -> int:
        """M: one-byte codes per token (with ``norm=1``, M-1 codebooks and the norm code)."""
        if self.norm and self.method in ("sq8", "sq4"):
            raise QuantizeError(f"{self.method}: norm=1 applies to pq, opq, pca and rq")
        if self.refine and self.method != "rq":
            raise QuantizeError(f"{self.method}: refine applies to rq (k-means codebooks are already least-squares optimal)")
        if self.method == "sq8":
            return dim
        if self.method == "sq4":
            if dim % 2:
                raise QuantizeError(f"sq4 needs an even dim, got {dim}")
            return dim // 2
        m = self.m or max(1, dim // 16)  # default: 1/32 of fp16 bytes
        c = m - self.norm
        if c < 1:
            raise QuantizeError(f"{self.method}: M={m} leaves no codebook beside the norm code")
        if self.method in ("pq", "opq", "pca") and dim % c:
            raise QuantizeError(f"{self.method}: M={m} gives {c} codebooks, which must divide the feature dim {dim}"
                                + (" (with norm=1 one byte codes the norm)" if self.norm else ""))
        return m

    def key(self, dim: int) -> str:
        """The spec with M resolved for features of ``dim``: what a store records and compares."""
        return dataclasses.replace(self, m=self.resolve_m(dim)).describe()

    def describe(self) -> str:
        extra = f",beam={self.beam},train_beam={self.train_beam}" + (f",refine={self.refine}" if self.refine else "")
        return f"{self.method}:M={self.m}" + (extra if self.method == "rq" else "") + (",norm=1" if self.norm else "")
