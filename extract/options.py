"""The settings of one extraction run, validated, with their defaults: the one place they live.

Light on purpose: ``kdcache extract --help`` shows these defaults without importing torch.
"""
from __future__ import annotations

from dataclasses import dataclass

from kdcache.data.corpus import DECODE_MODES, FOLDER_SHARD_SIZE, MAX_PIXELS, MIN_SIZE, DecodeOptions, ReadOptions
from kdcache.data.walk import ON_ERROR
from kdcache.errors import KdcacheError
from kdcache.quantize.quantizer_spec import QuantizerSpec
from kdcache.store.dtypes import STORAGE_DTYPES
from kdcache.store.lease import LEASE_SECONDS
from kdcache.store.meta import CODECS
from kdcache.store.schema import MAX_DENSE_SCALE


class ExtractError(KdcacheError):
    pass


@dataclass(frozen=True)
class ExtractOptions:
    """Settings of one extraction run (CLI options map 1:1). Validated on construction: a bad
    value is one line naming the option."""

    views: int = 1
    seed: int = 0
    dtype: str = "float16"
    codec: str = "auto"
    device: str = "auto"
    batch_size: int = 32
    workers: int = 1
    on_error: str = "skip"
    rank: int | None = None
    world_size: int | None = None
    folder_shard_size: int = FOLDER_SHARD_SIZE
    max_pixels: int = MAX_PIXELS
    min_size: int = MIN_SIZE
    decode: str = "full"  # full: the teacher's own preprocessing | reduced: JPEGs at the scale the crops need (opt-in)
    progress: bool = True
    quantize: str | None = None  # e.g. "opq:M=48": train on the first shards, store codes
    quantize_sample: int = 65536  # training tokens (plus held-out tokens for the fidelity figures)
    keep_float: bool = False  # keep the float patch arrays beside the codes
    quantize_pool: int = 4  # sample from the first shards holding >= pool x the training tokens
    lease_seconds: float = LEASE_SECONDS  # a shard's lease lasts this long unless renewed (store.lease)
    logits: int = 0  # store every teacher's top-K logits (and their log-sum-exp) per view; 0 = none
    dense_scale: int = 0  # also one patch map per image of the whole image at this many times the input; 0 = none
    pixels: str | None = None  # also every view's crop: [SIZE][:jpeg[QUALITY]|:raw] (store.meta.PixelSpec); None = none

    def __post_init__(self):
        at_least = {"views": 1, "batch_size": 1, "workers": 0, "folder_shard_size": 1, "max_pixels": 1, "min_size": 1,
                    "quantize_sample": 256, "quantize_pool": 1, "logits": 0, "dense_scale": 0}
        for name, low in at_least.items():
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise ExtractError(f"--{name.replace('_', '-')} {v!r}: need an integer >= {low}")
        for name, allowed in (("on_error", ON_ERROR), ("dtype", STORAGE_DTYPES), ("codec", CODECS),
                              ("decode", DECODE_MODES)):
            if getattr(self, name) not in allowed:
                raise ExtractError(f"--{name.replace('_', '-')} {getattr(self, name)!r}: expected one of {', '.join(allowed)}")
        if self.dense_scale > MAX_DENSE_SCALE:
            raise ExtractError(f"--dense-scale {self.dense_scale}: at most {MAX_DENSE_SCALE}")
        if not isinstance(self.lease_seconds, (int, float)) or not 1 <= self.lease_seconds <= 7 * 86400:
            raise ExtractError(f"--lease-seconds {self.lease_seconds!r}: need a number of seconds in 1..604800")
        if self.quantize is not None:
            QuantizerSpec.parse(self.quantize)  # a bad spec fails before any model is built
        if self.pixels is not None:  # its size and format, checked before any model is built
            from kdcache.store.meta import PixelSpec
            try:
                PixelSpec.parse(self.pixels, default_size=(224, 224), interpolation="bicubic")
            except KdcacheError as e:
                raise ExtractError(str(e)) from None

    @property
    def read_options(self) -> ReadOptions:
        return ReadOptions(folder_shard_size=self.folder_shard_size, decode=DecodeOptions(self.max_pixels, self.min_size,
                                                                                      reduced=self.decode == "reduced"))
