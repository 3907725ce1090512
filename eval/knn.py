"""k-nearest-neighbour classification of frozen features, as in DINO (Caron et al., 2021).

Cosine similarity (features L2-normalised, an exact inner-product search: a matmul and ``topk``
in torch, in slices of validation rows), the k nearest training samples vote for their class with
weight exp(similarity / T); top-1 and top-5 accuracy on the validation samples. k=20, T=0.07 by
default, DINO's protocol. The search is faiss's ``IndexFlatIP`` result (tested against it) without
faiss: evaluation needs no faiss install.
"""
from __future__ import annotations

import numpy as np
import torch

from kdcache.errors import KdcacheError

from .options import ProbeOptions


def knn_classify(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray, *, k: int = ProbeOptions.k,
                 temperature: float = ProbeOptions.temperature) -> dict:
    """{top1, top5, n_train, n_val, classes} for features (N, D) and integer labels (N,)."""
    if len(train_x) == 0 or len(val_x) == 0:
        raise KdcacheError(f"kNN needs training and validation samples (got {len(train_x)} and {len(val_x)})")
    if k < 1 or temperature <= 0:
        raise KdcacheError(f"kNN: k={k}, T={temperature}: need k >= 1 and T > 0")
    classes = int(max(train_y.max(), val_y.max())) + 1
    tx, vx = _unit(train_x), _unit(val_x)
    k = min(k, len(tx))
    sims, idx = nearest(tx, vx, k)
    votes = np.zeros((len(vx), classes), dtype=np.float64)
    np.add.at(votes, (np.repeat(np.arange(len(vx)), k), train_y[idx].reshape(-1)), np.exp(sims.reshape(-1) / temperature))
    ranked = np.argsort(-votes, axis=1, kind="stable")
    top1 = float((ranked[:, 0] == val_y).mean())
    top5 = float((ranked[:, :5] == val_y[:, None]).any(1).mean())
    return {"top1": top1, "top5": top5, "n_train": int(len(tx)), "n_val": int(len(vx)), "classes": classes, "k": k,
            "temperature": temperature}


SEARCH_BYTES = 1 << 28  # similarities held at once: 256 MB, whatever the number of training samples


def nearest(train: np.ndarray, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(similarities, indices), each (len(query), k): the k largest inner products of each query
    row with the training rows, largest first (exact, as faiss's IndexFlatIP)."""
    t = torch.from_numpy(np.ascontiguousarray(train, dtype=np.float32))
    q = torch.from_numpy(np.ascontiguousarray(query, dtype=np.float32))
    rows = max(1, SEARCH_BYTES // (4 * max(1, len(t))))
    sims = np.empty((len(q), k), dtype=np.float32)
    idx = np.empty((len(q), k), dtype=np.int64)
    for start in range(0, len(q), rows):
        top = torch.topk(q[start:start + rows] @ t.T, k, dim=1)
        sims[start:start + rows], idx[start:start + rows] = top.values.numpy(), top.indices.numpy()
    return sims, idx


def seeded_split(n: int, *, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, val indices): a seeded permutation, the last ``val_fraction`` for validation."""
    if not 0 < val_fraction < 1:
        raise KdcacheError(f"--val-fraction {val_fraction}: need a number in (0, 1)")
    order = np.random.default_rng(seed).permutation(n)
    cut = n - max(1, int(round(n * val_fraction)))
    return np.sort(order[:cut]), np.sort(order[cut:])


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
