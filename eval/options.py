"""The probes' protocol settings, with their defaults: the one place they live.

Light on purpose: ``kdcache eval ... --help`` shows these defaults without importing torch.
"""
from __future__ import annotations

from dataclasses import dataclass

from kdcache.errors import KdcacheError

PROBES = ("knn", "linear")


@dataclass(frozen=True)
class ProbeOptions:
    """kNN is DINO's protocol (cosine, k neighbours vote with weight exp(sim / temperature)); the
    linear probe is a logistic regression whose C is chosen on the training split only. Both
    score a seeded split (``val_fraction`` held out) unless a validation corpus is given."""

    probe: str = "knn"
    k: int = 20
    temperature: float = 0.07
    val_fraction: float = 0.2
    seed: int = 0

    def __post_init__(self):
        if self.probe not in PROBES:
            raise KdcacheError(f"probe {self.probe!r}: expected one of {', '.join(PROBES)}")
        if not isinstance(self.k, int) or self.k < 1 or not self.temperature > 0:
            raise KdcacheError(f"kNN: k={self.k}, T={self.temperature}: need k >= 1 and T > 0")
        if not 0 < self.val_fraction < 1:
            raise KdcacheError(f"--val-fraction {self.val_fraction}: need a number in (0, 1)")


STORE_REPORT_TOKENS = 16384  # ``eval store``: stored tokens to measure quantization fidelity on (floats kept)
