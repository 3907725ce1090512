"""Metrics of a run: metrics.csv, TensorBoard events in tb/, loss.png (losses per teacher), and
what the run did not train on (RUN/skipped.jsonl, summed up)."""
from __future__ import annotations

import csv
import os

from kdcache.data.stream import read_skips

from .rundir import RunDir


class MetricsLog:
    def __init__(self, run: RunDir, columns: list[str], *, keep_until: int | None = None):
        """``keep_until``: resuming from this step; earlier rows stay, later ones (written
        after that checkpoint by the interrupted run) are dropped."""
        self.path = run.metrics
        self.columns = ["step", "epoch", "lr", "loss", *columns, "samples_per_s", "skipped_samples"]
        kept = []
        if keep_until is not None and os.path.exists(self.path):
            with open(self.path) as f:
                kept = [r for r in csv.DictReader(f) if int(r["step"]) <= keep_until]
        self._file = open(self.path, "w", newline="")
        self._csv = csv.DictWriter(self._file, fieldnames=self.columns)
        self._csv.writeheader()
        self._csv.writerows(kept)
        try:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(run.tensorboard)
        except ImportError:  # tensorboard is optional
            self._tb = None

    def log(self, row: dict) -> None:
        self._csv.writerow({k: row.get(k, "") for k in self.columns})
        self._file.flush()
        if self._tb is not None:
            for k, v in row.items():
                if k not in ("step", "epoch") and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, row["step"])

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(run: RunDir) -> list[dict]:
    """RUN/metrics.csv as rows of strings (what the plot, the report and the studies read)."""
    with open(run.metrics) as f:
        return list(csv.DictReader(f))


def logged_weights(rows: list[dict]) -> dict[str, list[float]]:
    """{objective: its weight at every logged step} from ``read_metrics`` rows: the ``weight/*``
    columns that --balance mgda / dto and --teacher-drop log; empty for static weights."""
    cols = [c for c in (rows[0] if rows else {}) if c.startswith("weight/")]
    return {c.split("/", 1)[1]: [float(r[c]) for r in rows] for c in cols}


def plot_losses(run: RunDir, teachers: list[str], path: str | None = None) -> str:
    """loss.png (or ``path``): total loss and each teacher's summary/patch loss against the step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = read_metrics(run)
    steps = [int(r["step"]) for r in rows]
    weights = logged_weights(rows)
    panels = 1 + len(teachers) + (1 if weights else 0)
    fig, axes = plt.subplots(1, panels, figsize=(4.5 * panels, 3.6), squeeze=False)
    axes[0][0].plot(steps, [float(r["loss"]) for r in rows], color="k", label="total")
    if rows and rows[0].get("task", "") != "":
        axes[0][0].plot(steps, [float(r["task"]) for r in rows], label="task")
        axes[0][0].legend()
    axes[0][0].set(title="total loss", xlabel="step")
    for ax, t in zip(axes[0][1:], teachers):
        for part in ("summary", "patch"):
            ax.plot(steps, [float(r[f"{t}/{part}"]) for r in rows], label=part)
        ax.set(title=f"teacher {t}", xlabel="step")
        ax.legend()
    if weights:  # --balance mgda / dto, --teacher-drop: the weight each objective got
        ax = axes[0][-1]
        for objective, values in weights.items():
            ax.plot(steps, values, label=objective)
        ax.set(title="objective weights", xlabel="step")
        ax.legend()
    fig.tight_layout()
    path = path or run.loss_plot
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def skipped_summary(run: RunDir, *, logged: bool) -> dict:
    """Corrupt shards skipped (``--skip-corrupt``) and bad images (``--online``): unique per epoch,
    whatever resumes replayed. ``logged``: the run keeps a skip log."""
    records = {(r["epoch"], r["shard"], r.get("block"), r.get("key")): r for r in read_skips(run.skip_log if logged else None)}
    out = {"shards": sorted({r["shard"] for r in records.values()}),
           "samples": sum(r["samples_skipped"] or 0 for r in records.values()),
           "errors": sorted({f"{r['shard']}: {r['error']}" for r in records.values()})}
    unknown = sorted({r["shard"] for r in records.values() if r["samples_skipped"] is None})
    if unknown:  # a shard skipped whole whose size nothing readable says: counted as unknown, never as 0
        out["shards_of_unknown_size"] = unknown
    return out


class SkippedSamples:
    """The running count for metrics.csv: the skip log is re-read only when it has grown (loader
    workers append to it), not on every logged step."""

    def __init__(self, run: RunDir, *, logged: bool):
        self.run, self.logged, self.size, self.count = run, logged, -1, 0

    def __call__(self) -> int:
        if not self.logged:
            return 0
        path = self.run.skip_log
        size = os.path.getsize(path) if os.path.exists(path) else 0
        if size != self.size:
            self.size, self.count = size, skipped_summary(self.run, logged=True)["samples"]
        return self.count
