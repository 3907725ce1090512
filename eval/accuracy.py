"""``kdcache eval accuracy``: what a student trained on soft labels says, against the corpus labels
and against its teacher.

The run's student is rebuilt as timm loads the export (its classifier in the teacher's classes);
its teacher is rebuilt live from what the run recorded (the store's teacher metadata: model,
checkpoint, preprocessing, checked against the stored weights fingerprint; or an online run's
spec). Every image of the corpus passes through the loader's stream (``data.stream``: the walk and
pixel stage of extraction), each model on its own eval view at its own input, from one decode. Reported: agreement with the teacher (top-1, the
teacher's top-1 within the student's top-5, mean KL(teacher || student) at T=1) on every image,
and top-1/top-5 against the corpus labels for the images that have them. Give a corpus the run
never trained on for held-out figures.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from tqdm import tqdm

from torch.utils.data import DataLoader

from kdcache.data.corpus import resolve_corpus
from kdcache.data.partition import ShardRows
from kdcache.data.pixels import Crop
from kdcache.data.pixels import corpus_places
from kdcache.data.stream import SampleStream, StreamSpec
from kdcache.data.transport import collate
from kdcache.errors import KdcacheError
from kdcache.train.rundir import RunDir
from kdcache.models.teacher import Teacher, create_teacher, teacher_from_meta
from kdcache.store.meta import TeacherMeta, ViewPolicy

from .model_features import EVAL_BLOCK, run_student


def run_teacher(run: str, name: str | None = None) -> Teacher:
    """The teacher whose soft labels the run learnt, live, as the run recorded it."""
    rundir = RunDir(run)
    prov = rundir.read_provenance()
    if prov.get("online"):
        specs = {s.split("=", 1)[0]: s for s in rundir.read_config().teachers}
        name = name or next(iter(specs))
        if name not in specs:
            raise KdcacheError(f"--teacher {name}: not a teacher of {run} ({', '.join(specs)})")
        return create_teacher(specs[name])
    metas = {t: TeacherMeta.from_dict(m) for t, m in prov["store_meta"]["teachers"].items()}
    soft = [t for t, m in metas.items() if m.logits]
    name = name or (soft[0] if soft else next(iter(metas)))
    if name not in metas:
        raise KdcacheError(f"--teacher {name}: not a teacher of {run}'s store ({', '.join(metas)})")
    return teacher_from_meta(name, metas[name])


@torch.inference_mode()
def accuracy(run: str, data: str | None, *, teacher: str | None = None, batch_size: int = 32, progress: bool = False) -> dict:
    net, sdata, described = run_student(run)
    classes = int(getattr(net, "num_classes", 0) or 0)
    if not classes:
        raise KdcacheError(f"--run {run}: the student has no classifier (it was trained without --logits-loss)")
    t = run_teacher(run, teacher)
    if t.classes != classes:
        raise KdcacheError(f"teacher {t.name} has {t.classes} classes, the student {classes}")
    s_policy = ViewPolicy.for_input(sdata.crop_pct, sdata.hw)
    t_policy = ViewPolicy.for_input(t.data.crop_pct, t.data.hw)
    mean = torch.tensor(sdata.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(sdata.std).view(1, 3, 1, 1) * 255
    crops = (("image", Crop(sdata.hw, sdata.interpolation)), ("teacher", Crop(t.input_hw, t.meta.interpolation)))
    if data:
        corpus = resolve_corpus(data)
        places = corpus_places(corpus)
        spec = StreamSpec(shards=tuple(ShardRows(n, len(p), EVAL_BLOCK) for n, p in places.items() if len(p)),
                          crops=crops, decode=replace(corpus.options.decode, reduced=False),  # as deployed: full decodes
                          views="eval", policy=s_policy, eval_policies=(s_policy, t_policy), shuffle=False, skip_bad=True)
        stream = SampleStream(spec, corpus, places=places)  # each model on its own eval view, from one decode
    else:  # the run's store keeps its views' pixels: both models on view 0 as stored (the teacher's eval crop)
        stream = _store_pixels(run, crops)
        data = f"{stream.spec.store_url} (view 0 pixels)"
    student_logits, teacher_logits, labels = [], [], []
    bar = tqdm(total=sum(s.count for s in spec.shards), unit="img", desc="accuracy", disable=not progress,
               dynamic_ncols=True)
    for batch in DataLoader(stream, batch_size=batch_size, collate_fn=collate):
        x = (batch["image"].float() - mean) / std
        student_logits.append(net(x).float())
        teacher_logits.append(t.outputs(batch["teacher"].to(t.device), logits=True)[2].cpu())
        labels += batch["label"].tolist()
        bar.update(len(batch["key"]))
    bar.close()
    skipped = stream.skipped
    if not student_logits:
        raise KdcacheError(f"{data}: no image to evaluate")
    s_logits, t_logits, y = torch.cat(student_logits), torch.cat(teacher_logits), torch.tensor(labels)
    log_q, log_p = F.log_softmax(s_logits, -1), F.log_softmax(t_logits, -1)
    t_top = t_logits.argmax(-1)
    s_top5 = s_logits.topk(min(5, classes), -1).indices
    out = {"run": run, "student": described, "teacher": t.name, "data": data, "images": len(y), "classes": classes,
           "skipped_samples": len(skipped),
           "agreement": {"top1": float((s_logits.argmax(-1) == t_top).float().mean()),
                         "teacher_top1_in_student_top5": float((s_top5 == t_top[:, None]).any(-1).float().mean()),
                         "mean_kl": float((log_p.exp() * (log_p - log_q)).sum(-1).mean())}}
    has = y >= 0
    if bool(has.any()):
        out["labelled_images"] = int(has.sum())
        if int(y.max()) >= classes:
            out["labels"] = f"not in the teacher's {classes} classes (largest label {int(y.max())}): accuracy not scored"
        else:
            for who, logits in (("student", s_logits), ("teacher", t_logits)):
                top5 = logits[has].topk(min(5, classes), -1).indices
                out[f"{who}_accuracy"] = {"top1": float((top5[:, 0] == y[has]).float().mean()),
                                          "top5": float((top5 == y[has][:, None]).any(-1).float().mean())}
    return out


def _store_pixels(run: str, crops) -> SampleStream:
    from kdcache.data.stream import shard_rows
    from kdcache.data.corpus import ReadOptions
    from kdcache.store import Store
    url = RunDir(run).read_config().store
    store = Store.open(url) if url else None
    if store is None or store.meta.pixels is None:
        raise KdcacheError(f"--data is required: {run}'s store {'(none: an online run) ' if not url else url + ' '}keeps "
                           f"no pixels of its views")
    spec = StreamSpec(shards=shard_rows(store, store.complete_shards()), crops=crops,
                      decode=replace(ReadOptions.from_dict(store.meta.corpus).decode, reduced=False), view_choice="first",
                      stored_views=store.meta.views, policy=store.meta.view_policy, shuffle=False, store_url=url,
                      source="pixels")
    return SampleStream(spec, None)


def format_accuracy(r: dict) -> str:
    a = r["agreement"]
    lines = [f"# accuracy: {r['student']} vs teacher {r['teacher']} on {r['data']}",
             f"{r['images']} images, {r['classes']} classes" + (f", {r['skipped_samples']} skipped" if r["skipped_samples"] else ""),
             "", "| agreement top-1 | teacher's top-1 in student's top-5 | mean KL(teacher, student) |", "|---|---|---|",
             f"| {a['top1']:.4f} | {a['teacher_top1_in_student_top5']:.4f} | {a['mean_kl']:.4f} |"]
    if "student_accuracy" in r:
        lines += ["", f"against the corpus labels ({r['labelled_images']} images, read as classes of the teacher's head):", "",
                  "| | top-1 | top-5 |", "|---|---|---|"]
        lines += [f"| {who} | {r[f'{who}_accuracy']['top1']:.4f} | {r[f'{who}_accuracy']['top5']:.4f} |"
                  for who in ("student", "teacher")]
    elif "labels" in r:
        lines.append(f"labels: {r['labels']}")
    return "\n".join(lines)
