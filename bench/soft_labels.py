"""``kdcache bench softlabels``: do cached top-K soft labels teach as well as a live teacher?

(a) **ImageNet teacher.** The shipped EfficientNet-Lite0 (1000 classes) teaches a small student
on crops of the 19 photos that ship in scikit-learn and scikit-image, with K stored views; the
student is scored by its agreement with the teacher on held-out crops of the same photos (another
seed: other boxes and sizes; `eval accuracy`). Held-out crops of other photos would ask for
classes the student never heard of: with 19 source photos the teacher's top-1 classes on one
photo are mostly not those of another: cached top-K soft labels vs online (the live teacher's full logits) vs cached
top-1 (renormalised: the teacher's hard labels). Same student, steps, views distribution
(the cached runs take views 1..K-1 in turn, `--view-choice augmented`, as the online run draws
fresh ones) and seeds; only the soft labels teach (the feature losses are off).
(b) **Digits.** A classifier teacher (ResNet-18 at 64 px) trained here on the digits (10 classes, all stored: the exact
distribution) teaches a student; scored against held-out digit labels: soft labels alone, hard
labels alone, both. Same steps and seeds.
(c) **Bytes.** Bytes per stored view of top-K soft labels for each K, on disk, on a store of one
large shard (so its fixed costs are amortised), beside the raw bytes.

Every row is the mean and sd over seeds; differences are paired by seed with a 95% t-interval.
Results land in ``OUT/softlabels.json`` and ``OUT/softlabels.md``; finished runs are reused.
"""
from __future__ import annotations

import os
from dataclasses import asdict

from kdcache.data.demo_corpus import build_demo_corpus
from kdcache.eval.accuracy import accuracy
from kdcache.eval.store_report import store_report
from kdcache.extract.options import ExtractOptions
from kdcache.extract.run import extract
from kdcache.models.convert_weights import shipped_teacher
from kdcache.store import Store
from kdcache.train.rundir import kept_json

from .harness import environment
from .options import SoftLabelsPlan
from .studies import paired, spread, train_variant, write_study
from .teachers import train_classifier

DIGITS_TEACHER = "resnet18"


def _store(out: str, corpus: str, teacher: str, *, views: int, k: int, progress: bool, workers: int) -> str:
    if not Store.exists(out):
        extract(corpus, out, [teacher], ExtractOptions(views=views, logits=k, batch_size=32, workers=workers,
                                                       progress=progress))
    return out


def _scored(run: str, data: str, key: tuple[str, ...]) -> float:
    """The run's figure on ``data`` (kept beside the run: a resumed study does not score twice)."""
    r = kept_json(os.path.join(run, "softlabels-eval.json"), lambda: accuracy(run, data))
    for part in key:
        r = r[part]
    return float(r)


def imagenet_part(out: str, plan: SoftLabelsPlan, *, progress: bool) -> dict:
    corpus, held = os.path.join(out, "photos"), os.path.join(out, "held-out-photos")
    build_demo_corpus(corpus, digits=0, photos=plan.photos, shard_size=128, photo_source="all")
    build_demo_corpus(held, digits=0, photos=plan.held_photos, shard_size=128, seed=1, photo_source="all")
    teacher = shipped_teacher(out)
    store = _store(os.path.join(out, f"effnet-top{plan.k}.zarr"), corpus, teacher, views=plan.views, k=plan.k,
                   progress=progress, workers=plan.workers)
    common = dict(data=corpus, student=plan.student, epochs=plan.epochs, batch_size=plan.batch_size, lr=plan.lr,
                  warmup_steps=4, head_hidden=64, workers=plan.workers, log_every=5, summary_weight=0.0, patch_weight=0.0,
                  normalize="none", logits_loss="kl", temperature=plan.temperature)
    variants = {f"cached top-{plan.k}": dict(store=store, view_choice="augmented"),
                "online (full logits)": dict(store="", online=True, teachers=(teacher,), online_stats_images=1),
                "cached top-1 (hard teacher labels)": dict(store=store, view_choice="augmented", logits_top=1,
                                                           logits_tail="renorm")}
    rows = {}
    for name, kw in variants.items():
        agreement, kl, steps, seconds = [], [], set(), []
        for seed in plan.seeds:
            run = os.path.join(out, "imagenet-" + "".join(c if c.isalnum() else "-" for c in name).strip("-") + f"-s{seed}")
            r = train_variant(run, progress=progress, seed=seed, **common, **kw)
            steps.add(r["steps"])
            seconds.append(r["fit_seconds"])
            agreement.append(_scored(run, held, ("agreement", "top1")))
            kl.append(_scored(run, held, ("agreement", "mean_kl")))
        rows[name] = {"agreement_top1": agreement, "mean": spread(agreement), "mean_kl": kl, "kl": spread(kl),
                      "steps": sorted(steps), "fit_seconds": spread(seconds)}
    online = rows["online (full logits)"]
    for name, row in rows.items():
        row["vs_online"] = paired(row["agreement_top1"], online["agreement_top1"]) if name != "online (full logits)" else None
        row["kl_vs_online"] = paired(row["mean_kl"], online["mean_kl"]) if name != "online (full logits)" else None
        row["over_online"] = row["mean"]["mean"] / online["mean"]["mean"] if online["mean"]["mean"] else None
    return {"teacher": "EfficientNet-Lite0 (ImageNet, 1000 classes)", "rows": rows,
            "held_out": f"{plan.held_photos} held-out crops of the same 19 photos"}


def digits_part(out: str, plan: SoftLabelsPlan, *, progress: bool) -> dict:
    corpus, held = os.path.join(out, "digits"), os.path.join(out, "held-out-digits")
    build_demo_corpus(corpus, digits=plan.digits, photos=0, shard_size=200, digit_size=32)
    build_demo_corpus(held, digits=plan.held_digits, photos=0, shard_size=200, digit_size=32, first_digit=plan.digits)
    ckpt = train_classifier(corpus, os.path.join(out, "teacher", "resnet18-digits.safetensors"), model=DIGITS_TEACHER,
                            kwargs={}, epochs=plan.teacher_epochs, flip=False)
    teacher = f"cnn={DIGITS_TEACHER},pretrained=false,img_size=64,num_classes=10,checkpoint={ckpt}"
    store = _store(os.path.join(out, "digits-top10.zarr"), corpus, teacher, views=plan.views, k=10, progress=progress,
                   workers=plan.workers)
    common = dict(store=store, data=corpus, student=plan.digit_student, epochs=plan.digit_epochs, batch_size=plan.batch_size,
                  lr=plan.lr, warmup_steps=4, head_hidden=64, workers=plan.workers, log_every=5, summary_weight=0.0,
                  patch_weight=0.0, normalize="none", logits_loss="kl", temperature=plan.temperature)
    variants = {"soft labels": {}, "hard labels only": dict(logits_weight=0.0, label_loss="ce"),
                "soft + hard labels": dict(label_loss="ce")}
    rows = {}
    for name, kw in variants.items():
        acc, steps = [], set()
        for seed in plan.seeds:
            run = os.path.join(out, "digits-" + "".join(c if c.isalnum() else "-" for c in name).strip("-") + f"-s{seed}")
            r = train_variant(run, progress=progress, seed=seed, **common, **kw)
            steps.add(r["steps"])
            acc.append(_scored(run, held, ("student_accuracy", "top1")))
        rows[name] = {"accuracy_top1": acc, "mean": spread(acc), "steps": sorted(steps)}
    teacher_acc = _scored(os.path.join(out, "digits-soft-labels-s" + str(plan.seeds[0])), held, ("teacher_accuracy", "top1"))
    hard = rows["hard labels only"]["accuracy_top1"]
    for name, row in rows.items():
        row["vs_hard_labels"] = paired(row["accuracy_top1"], hard) if name != "hard labels only" else None
    return {"teacher": f"ResNet-18 at 64 px trained here on {plan.digits} digits (10 classes)", "teacher_accuracy": teacher_acc,
            "rows": rows, "held_out": f"the next {plan.held_digits} digits of load_digits"}


def bytes_part(out: str, plan: SoftLabelsPlan, *, progress: bool) -> dict:
    corpus = os.path.join(out, "bytes-photos")
    build_demo_corpus(corpus, digits=0, photos=plan.bytes_images, shard_size=plan.bytes_images, seed=2)
    teacher = shipped_teacher(out)
    rows = {}
    for k in plan.bytes_k:
        store = _store(os.path.join(out, f"bytes-top{k}.zarr"), corpus, teacher, views=1, k=k, progress=progress,
                       workers=plan.workers)
        lo = store_report(store)["teachers"]["effnet"]["logits"]
        rows[k] = {"bytes_per_view": lo["bytes_per_view"], "raw_bytes_per_view": lo["raw_bytes_per_view"]}
    return {"images": plan.bytes_images, "classes": 1000, "rows": rows}


def soft_labels_study(out: str, plan: SoftLabelsPlan = SoftLabelsPlan(), *, progress: bool = True) -> dict:
    os.makedirs(out, exist_ok=True)
    result = {"plan": asdict(plan), "environment": environment()}
    parts = {"imagenet": imagenet_part, "digits": digits_part, "bytes": bytes_part}
    for name in plan.parts:
        result[name] = parts[name](out, plan, progress=progress)
    return write_study(out, "softlabels", result, format_soft_labels(result))


def format_soft_labels(r: dict) -> str:
    p = r["plan"]
    f = lambda s: f"{s['mean']:.3f} ± {s['sd']:.3f}"  # noqa: E731
    d = lambda x: "-" if x is None else f"{x['mean']:+.3f} [{x['low']:+.3f}, {x['high']:+.3f}]"  # noqa: E731
    lines = [f"# soft labels: {len(p['seeds'])} seeds per row (mean ± sd), paired differences with 95% intervals"]
    if "imagenet" in r:
        a = r["imagenet"]
        lines += ["", f"## (a) {a['teacher']} -> {p['student']}: agreement with the teacher on {a['held_out']}",
                  f"{p['photos']} training photos, K={p['views']} views, {p['epochs']} epochs of batch {p['batch_size']}, "
                  f"T={p['temperature']}, soft labels only", "",
                  "| variant | steps | top-1 agreement | / online | vs online | mean KL(teacher, student) | vs online |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {name} | {row['steps'][0]} | {f(row['mean'])} | "
                  f"{'-' if row['over_online'] is None else format(row['over_online'], '.3f')} | {d(row['vs_online'])} | "
                  f"{f(row['kl'])} | {d(row['kl_vs_online'])} |" for name, row in a["rows"].items()]
    if "digits" in r:
        g = r["digits"]
        lines += ["", f"## (b) {g['teacher']} -> {p['digit_student']}: accuracy on {g['held_out']}",
                  f"teacher accuracy {g['teacher_accuracy']:.3f}; {p['digit_epochs']} epochs", "",
                  "| variant | steps | top-1 accuracy | vs hard labels only |", "|---|---|---|---|"]
        lines += [f"| {name} | {row['steps'][0]} | {f(row['mean'])} | {d(row['vs_hard_labels'])} |"
                  for name, row in g["rows"].items()]
    if "bytes" in r:
        b = r["bytes"]
        lines += ["", f"## (c) bytes per stored view, {b['classes']} classes, one shard of {b['images']} images, lz4", "",
                  "| K | bytes/view on disk | raw (values fp16 + indices uint16 + log-sum-exp fp32) |", "|---|---|---|"]
        lines += [f"| {k} | {row['bytes_per_view']:.1f} | {row['raw_bytes_per_view']} |" for k, row in b["rows"].items()]
    return "\n".join(lines)
