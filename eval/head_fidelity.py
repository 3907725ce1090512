"""``kdcache eval fidelity``: how closely a run's student heads reproduce each teacher.

The run is rebuilt from its directory (``train.fit.build_run(..., evaluate=True)``: its config,
its statistics, its last checkpoint; nothing is written), the loader streams the chosen shards of
a store (or, for an ``--online`` run, the corpus with its teachers run live) with view 0 (the
eval view) and no augmentation, and per teacher the mean cosine between head outputs and the
targets is reported for summary and patch tokens separately, in the normalised space the losses
use and in the teacher's own feature space. Evaluate on shards the run did not train on
(``--shards``, or a store the run never saw) for a held-out figure.
"""
from __future__ import annotations

import dataclasses
import fnmatch

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from kdcache.errors import KdcacheError
from kdcache.train.config import TrainConfig
from kdcache.train.fit import build_run
from kdcache.train.rundir import RunDir
from kdcache.data.transport import collate
from kdcache.train.trainer import to_device


def run_config(run: str, **changes) -> TrainConfig:
    """The run's config as it trained, to rebuild its model and targets (``changes``: options)."""
    return RunDir(run).read_config().replace(out=run, resume=False, overwrite=False, **changes)


@torch.inference_mode()
def fidelity(run: str, *, store: str | None = None, data: str | None = None, shards: str | None = None,
             batch_size: int = 32) -> dict:
    cfg = run_config(run, workers=0, **{k: v for k, v in (("store", store), ("data", data)) if v})
    run_ = build_run(cfg, evaluate=True, progress=False)
    trainer, source = run_.trainer, run_.source
    chosen = [s for s in source.shards if shards is None or fnmatch.fnmatchcase(s.name, shards)]
    if not chosen:
        raise KdcacheError(f"--shards {shards!r}: no shard of {cfg.store or cfg.data.corpus} matches")
    spec = dataclasses.replace(source.dataset.spec, shards=tuple(chosen), view_choice="first", shuffle=False,
                               color_jitter=0.0, workers=0, sub_views=0.0, dense_views=False)
    sums = {t: {"summary": [0.0, 0.0], "patch": [0.0, 0.0], "summary_raw": [0.0, 0.0], "patch_raw": [0.0, 0.0]}
            for t in source.teachers}
    trainer.model.eval()
    for batch in DataLoader(source.dataset.with_spec(spec), batch_size=batch_size, collate_fn=collate):
        batch = to_device(batch, trainer.device)
        preds, targets = trainer.model(batch["image"]), trainer.decode(batch)
        for t in source.teachers:
            norm, (summary, patches), target = trainer.targets[t].norm, preds[t], targets[t]
            _add(sums[t]["summary"], summary, target["summary"])
            _add(sums[t]["summary_raw"], norm["cls"].inverse(summary), norm["cls"].inverse(target["summary"]))
            if "patch" in target:  # (code-prediction runs output logits, not features)
                _add(sums[t]["patch"], patches, target["patch"])
                _add(sums[t]["patch_raw"], norm["patch"].inverse(patches), norm["patch"].inverse(target["patch"]))
    out = {t: {k: (v[0] / v[1] if v[1] else None) for k, v in parts.items()} for t, parts in sums.items()}
    return {"run": run, "store": cfg.store or "online (teachers run live)", "shards": [s.name for s in chosen], "view": 0,
            "teachers": {t: {"summary_cos": o["summary"], "patch_cos": o["patch"], "summary_cos_teacher_space": o["summary_raw"],
                             "patch_cos_teacher_space": o["patch_raw"]} for t, o in out.items()}}


def _add(acc: list, pred: torch.Tensor, target: torch.Tensor) -> None:
    cos = F.cosine_similarity(pred.float(), target.float(), dim=-1)
    acc[0] += float(cos.sum())
    acc[1] += cos.numel()


def format_fidelity(r: dict) -> str:
    lines = [f"# fidelity of {r['run']} on {len(r['shards'])} shard(s) of {r['store']} (view 0)", "",
             "| teacher | summary cos | patch cos | summary cos (teacher space) | patch cos (teacher space) |",
             "|---|---|---|---|---|"]
    f = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    for t, v in r["teachers"].items():
        lines.append(f"| {t} | {f(v['summary_cos'])} | {f(v['patch_cos'])} | {f(v['summary_cos_teacher_space'])} | "
                     f"{f(v['patch_cos_teacher_space'])} |")
    return "\n".join(lines)
