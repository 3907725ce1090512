"""A run directory: the one place that knows its layout.

```
RUN/config.json            the resolved TrainConfig      RUN/config.yaml|toml  a copy of --config
RUN/provenance.json        the store's metadata          RUN/metrics.csv, RUN/tb/, RUN/loss.png
RUN/skipped.jsonl          corrupt blocks and changed images skipped (--skip-corrupt), bad images (--online)
RUN/plan.json              what the epochs are made of (shards, counts, digests): a resume checks it
RUN/epochs.jsonl           per finished epoch: samples planned, delivered, dropped, padded, skipped
RUN/keys/rank<R>.jsonl     --log-keys: every key each rank delivered, per step
RUN/stats/                 target statistics computed for this run (the store had none, or stale ones;
                           an online run's teachers): <teacher>.<kind>.safetensors + .json
RUN/checkpoints/last/      student.safetensors, heads.safetensors, ema.safetensors (with EMA),
                           optimizer.pt, trainer.pt (tensors only), state.json
```
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np

from kdcache.errors import KdcacheError, check_output


def kept_json(path: str, make, *, key: str | None = None):
    """The JSON kept at ``path`` (beside a run, or a study's), or ``make()`` written there first:
    a report or a resumed study does not redo what it has. ``key``: what the value depends on; a
    file kept under another key (or half-written, or foreign) is recomputed. Written through a
    temporary file renamed into place."""
    try:
        with open(path) as f:
            kept = json.load(f)
        if isinstance(kept, dict) and kept.get("key") == key and "value" in kept:
            return kept["value"]
    except (OSError, ValueError):
        pass
    value = make()
    tmp = f"{path}.{os.getpid()}.partial"
    with open(tmp, "w") as f:
        json.dump({"key": key, "value": value}, f, indent=2)
    os.replace(tmp, path)
    return value


class RunDir:
    def __init__(self, path: str):
        self.path = path

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    @property
    def config(self) -> str:
        return self.file("config.json")

    @property
    def metrics(self) -> str:
        return self.file("metrics.csv")

    @property
    def loss_plot(self) -> str:
        return self.file("loss.png")

    @property
    def skip_log(self) -> str:
        """``--skip-corrupt``: one JSON line per corrupt shard skipped (written by loader workers)."""
        return self.file("skipped.jsonl")

    @property
    def epoch_log(self) -> str:
        """One JSON line per finished epoch: samples planned, delivered, dropped, padded, skipped."""
        return self.file("epochs.jsonl")

    def keys_log(self, rank: int) -> str:
        """``--log-keys``: the keys rank ``rank`` delivered, one JSON line per step."""
        return os.path.join(self.path, "keys", f"rank{rank}.jsonl")

    def read_plan(self) -> dict | None:
        """RUN/plan.json (what the run's epochs are made of), or None for a run from before it."""
        try:
            with open(self.file("plan.json")) as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise KdcacheError(f"{self.file('plan.json')}: unreadable ({e})") from None

    def append_jsonl(self, path: str, record: dict) -> None:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")

    @property
    def tensorboard(self) -> str:
        return self.file("tb")

    @property
    def checkpoint(self) -> str:
        return os.path.join(self.path, "checkpoints", "last")

    def checkpoint_file(self, name: str) -> str:
        return os.path.join(self.checkpoint, name)

    def has_checkpoint(self) -> bool:
        return os.path.exists(self.checkpoint_file("state.json"))

    def holds_run(self) -> bool:
        """A run that reached a checkpoint. A directory whose run stopped before its first one (it
        failed, or was killed) holds nothing worth keeping: the next start reuses it."""
        return self.has_checkpoint()

    RUN_FILES = ("checkpoints", "tb", "metrics.csv", "loss.png", "config.json", "provenance.json", "skipped.jsonl", "stats",
                 "report", "plan.json", "epochs.jsonl", "keys")

    def check(self, *, resume: bool, overwrite: bool) -> None:
        """Refuse to train over a started run unless asked, into a store, or where nothing can be
        written (before anything is built)."""
        check_output(self.path, kind="dir")
        if os.path.exists(self.file("zarr.json")):
            raise KdcacheError(f"--out {self.path}: a Zarr store (kdcache's or another's), not a run directory; train "
                               f"into another directory")
        if resume and not self.has_checkpoint():
            raise KdcacheError(f"--resume: no checkpoint in {self.checkpoint}")
        if self.holds_run() and not (resume or overwrite):
            raise KdcacheError(f"--out {self.path} holds a run already; pass --resume to continue it or --overwrite to replace it")

    def prepare(self, *, resume: bool, overwrite: bool) -> None:
        """Create the directory (once the run is built). A fresh start clears what an earlier start
        left: with ``overwrite`` a whole run, else the files of a run that never checkpointed."""
        self.check(resume=resume, overwrite=overwrite)
        if not resume:
            for name in self.RUN_FILES:
                p = self.file(name)
                shutil.rmtree(p, ignore_errors=True) if os.path.isdir(p) else (os.path.exists(p) and os.remove(p))
        try:
            os.makedirs(self.path, exist_ok=True)
        except OSError as e:
            raise KdcacheError(f"--out {self.path}: cannot create the run directory: {e.strerror}") from None

    def write_config(self, config_json: str, config_file: str | None) -> None:
        with open(self.config, "w") as f:
            f.write(config_json)
        if config_file:
            shutil.copyfile(config_file, self.file("config" + os.path.splitext(config_file)[1]))

    def write_json(self, name: str, obj) -> None:
        with open(self.file(name), "w") as f:
            json.dump(obj, f, indent=2)

    # -- readers: every command that reads a run reads it through these ------------------------
    def read_json(self, name: str, what: str) -> dict:
        """RUN/<name> as JSON; a one-line error naming the run when it is missing or unreadable."""
        path = self.file(name)
        try:
            with open(path) as f:
                return json.load(f)
        except FileNotFoundError:
            raise KdcacheError(f"{self.path}: not a kdcache run directory ({name} missing)") from None
        except (OSError, ValueError) as e:
            raise KdcacheError(f"{path}: cannot read the run's {what} ({type(e).__name__}: {e})") from None

    def read_config(self):
        """RUN/config.json as the ``TrainConfig`` it was written from (sections; or flat, a run
        written before them)."""
        from .config import ConfigError, TrainConfig
        d = self.read_json("config.json", "config")
        try:
            return TrainConfig.from_dict(d if isinstance(d, dict) else {}, where=self.config)
        except ConfigError as e:
            raise KdcacheError(f"{self.config}: not a config this kdcache reads ({e})") from None

    def read_provenance(self) -> dict:
        """RUN/provenance.json: the store's metadata or the live teachers, the student as built."""
        return self.read_json("provenance.json", "provenance")

    def read_epochs(self) -> list[dict]:
        """RUN/epochs.jsonl, one record per epoch (a resumed epoch's later line wins); none for a run
        from before it."""
        if not os.path.exists(self.epoch_log):
            return []
        rows = {}
        try:
            with open(self.epoch_log) as f:
                for line in f:
                    if line.strip():
                        r = json.loads(line)
                        rows[r["epoch"]] = r
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise KdcacheError(f"{self.epoch_log}: unreadable ({type(e).__name__}: {e})") from None
        return [rows[e] for e in sorted(rows)]

    # -- statistics computed for this run ---------------------------------------------------
    def _stats_files(self, teacher: str, kind: str) -> tuple[str, str]:
        base = os.path.join(self.file("stats"), f"{teacher}.{kind}")
        return base + ".safetensors", base + ".json"

    def save_stats(self, teacher: str, kind: str, st: dict) -> None:
        """{count, mean, covariance, source}: arrays as safetensors, the rest as JSON."""
        import safetensors.numpy
        arrays, meta = self._stats_files(teacher, kind)
        os.makedirs(os.path.dirname(arrays), exist_ok=True)
        safetensors.numpy.save_file({"mean": np.asarray(st["mean"]), "covariance": np.asarray(st["covariance"])}, arrays)
        with open(meta, "w") as f:
            json.dump({"count": st["count"], "source": st["source"]}, f)

    def load_stats(self, teacher: str, kind: str) -> dict | None:
        """What ``save_stats`` kept, or None (none kept, or not finite)."""
        import safetensors.numpy
        arrays, meta = self._stats_files(teacher, kind)
        if not (os.path.exists(arrays) and os.path.exists(meta)):
            return None
        t = safetensors.numpy.load_file(arrays)
        with open(meta) as f:
            m = json.load(f)
        if not (np.isfinite(t["mean"]).all() and np.isfinite(t["covariance"]).all()):
            return None
        return {"count": m["count"], "mean": t["mean"], "covariance": t["covariance"], "source": m["source"]}
