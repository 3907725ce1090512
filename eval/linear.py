"""Linear probe: logistic regression on frozen features, regularisation chosen on a validation split.

The held-out samples (the same seeded split as kNN) are never seen while choosing: the
training samples are split again (seeded), each C in a log grid is fitted on one part and scored
on the other, the best C is refitted on all training samples, and only then the held-out
samples are scored (top-1, top-5). Features are standardised with training statistics.
"""
from __future__ import annotations

import numpy as np

from kdcache.errors import KdcacheError

C_GRID = tuple(float(c) for c in np.logspace(-3, 2, 6))


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray, *, seed: int = 0,
                 grid=C_GRID) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from .knn import seeded_split
    if len(np.unique(train_y)) < 2:
        raise KdcacheError("linear probe: the training split holds fewer than two classes")
    inner_tr, inner_va = seeded_split(len(train_y), val_fraction=0.25, seed=seed + 1)
    scaler = StandardScaler().fit(train_x[inner_tr])
    scores = {}
    for c in grid:
        clf = LogisticRegression(C=c, max_iter=2000).fit(scaler.transform(train_x[inner_tr]), train_y[inner_tr])
        scores[c] = float((clf.predict(scaler.transform(train_x[inner_va])) == train_y[inner_va]).mean())
    best = max(grid, key=lambda c: (scores[c], -c))  # ties: the stronger regularisation
    scaler = StandardScaler().fit(train_x)
    clf = LogisticRegression(C=best, max_iter=2000).fit(scaler.transform(train_x), train_y)
    proba = clf.predict_proba(scaler.transform(val_x))
    ranked = clf.classes_[np.argsort(-proba, axis=1)]
    return {"top1": float((ranked[:, 0] == val_y).mean()), "top5": float((ranked[:, :5] == val_y[:, None]).any(1).mean()),
            "n_train": int(len(train_y)), "n_val": int(len(val_y)), "classes": int(len(np.unique(train_y))), "C": best,
            "validation_accuracy_by_C": {f"{c:g}": s for c, s in scores.items()}}
