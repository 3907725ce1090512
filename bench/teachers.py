"""``kdcache bench teachers``: the multi-teacher options, measured on two heterogeneous teachers.

The teachers: the shipped ImageNet-pretrained EfficientNet-Lite0 (1280-d, 7x7 grid at 224, post-
ReLU6 maps) and a small ViT trained here, supervised, on the corpus labels (192-d, 4x4 grid at
64): their widths, grids and magnitudes differ. Both are extracted into one store (K views);
then one student is distilled from it with each option, the same optimizer steps each:
static weights, PHI-S, ``--balance mgda``, ``--teacher-drop 0.5``, ``--head transformer``,
``--shared-adapter``, the task loss (static and under MGDA). Reported per variant: kNN of the
student's own summary features (``eval knn``) and per teacher the fidelity (``eval fidelity``:
mean cosine of the head outputs to the targets, summary and patch, on the eval view), so a
gain for one teacher at the other's expense shows. Results land in ``OUT/teachers.json`` and
``OUT/teachers.md``; finished parts are reused when the study is run again.
"""
from __future__ import annotations

import os
from dataclasses import asdict

import torch

from kdcache.data.corpus import resolve_corpus
from kdcache.data.demo_corpus import build_demo_corpus
from kdcache.data.pixels import Crop, view_pixels
from kdcache.data.views import WHOLE_IMAGE
from kdcache.data.walk import label_classes, record_to, screened
from kdcache.eval.head_fidelity import fidelity
from kdcache.eval.model_features import random_init_student, spec_model
from kdcache.eval.options import ProbeOptions
from kdcache.eval.store_features import probe_store
from kdcache.extract.options import ExtractOptions
from kdcache.extract.run import extract
from kdcache.models.convert_weights import shipped_teacher

from .harness import environment
from .options import PRETRAINED_VARIANTS, TEACHER_REFERENCES, TEACHER_VARIANTS, TeachersPlan
from .studies import kfold_scores, model_xy, paired, record, run_scores, same_steps, spread, train_variant, write_study

VIT_TEACHER = "vit_tiny_patch16_224"
VIT_KWARGS = dict(img_size=64, depth=4)


def train_vit_teacher(corpus: str, out: str, *, epochs: int, seed: int = 0) -> str:
    """A small ViT trained here, supervised on the corpus labels (whole images at 64 px, random
    flips): a second teacher with features of its own. Its checkpoint, kept in ``out``."""
    return train_classifier(corpus, out, model=VIT_TEACHER, kwargs=VIT_KWARGS, epochs=epochs, seed=seed)


def train_classifier(corpus: str, out: str, *, model: str, kwargs: dict, epochs: int, seed: int = 0,
                     flip: bool = True, size: int = 64) -> str:
    """A timm classifier trained here, supervised on the corpus labels (whole images at ``size``
    px, normalised as its timm data config says, random flips unless ``flip`` is off: digits are
    not symmetric). Its checkpoint, kept in ``out`` (an existing one is reused)."""
    import safetensors.torch
    import timm
    import torch.nn.functional as F
    if os.path.exists(out):
        return out
    c = resolve_corpus(corpus)
    images, labels, skipped = [], [], []
    for shard in c.shards:  # the whole image, through the pipeline's own stage
        labelled = (s for s in screened(c, shard, record_to(skipped)) if s.label is not None)
        for item in view_pixels(labelled, views=lambda s, h, w: WHOLE_IMAGE, crops=[Crop((size, size), "bilinear")],
                                decode=c.options.decode, handler=record_to(skipped)):
            images.append(item.crops[0][0].float() / 255)
            labels.append(item.sample.label)
    x, y = torch.stack(images), torch.tensor(labels)
    torch.manual_seed(seed)
    net = timm.create_model(model, pretrained=False, num_classes=int(y.max()) + 1, **kwargs)
    cfg = timm.data.resolve_model_data_config(net)
    x = (x - torch.tensor(cfg["mean"]).view(1, 3, 1, 1)) / torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.05)
    steps = epochs * ((len(x) + 63) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    net.train()
    from tqdm import tqdm
    for _ in tqdm(range(epochs), desc=f"train the {model} teacher", unit="epoch", dynamic_ncols=True):
        for idx in torch.randperm(len(x), generator=gen).split(64):
            xb = x[idx]
            if flip:
                flipped = torch.rand(len(idx), generator=gen) < 0.5
                xb = torch.where(flipped[:, None, None, None], xb.flip(-1), xb)
            loss = F.cross_entropy(net(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    os.makedirs(os.path.dirname(out), exist_ok=True)
    safetensors.torch.save_file(net.state_dict(), out)
    return out


def teachers_study(out: str, plan: TeachersPlan = TeachersPlan(), *, progress: bool = True) -> dict:
    os.makedirs(out, exist_ok=True)
    corpus = os.path.join(out, "corpus")
    if not os.path.isdir(corpus):
        build_demo_corpus(corpus, digits=plan.digits, photos=plan.photos)
    vit_ckpt = train_vit_teacher(corpus, os.path.join(out, "teacher", "vit_digits.safetensors"), epochs=plan.vit_epochs,
                                 seed=plan.seed)
    classes = label_classes(resolve_corpus(corpus))
    effnet = shipped_teacher(out)
    teachers = [effnet, f"vit={VIT_TEACHER},pretrained=false,img_size=64,depth=4,num_classes={classes},"
                        f"checkpoint={vit_ckpt}"]
    pretrained_student = f"{effnet.split('=', 1)[1]},img_size=64"  # the shipped EfficientNet-Lite0 as a student
    store = os.path.join(out, "store.zarr")
    def make_store():
        s = extract(corpus, store, teachers, ExtractOptions(views=plan.views, seed=plan.seed, batch_size=32,
                                                            workers=plan.workers, progress=progress))
        return {"path": store, "teacher_images": s.teacher_images}
    record(os.path.join(out, "store.json"), make_store)
    runs = []
    for name in plan.variants:
        options = dict(TEACHER_VARIANTS[name])
        student = pretrained_student if options.pop("pretrained_student", False) else plan.student
        for seed in plan.seeds:
            run = os.path.join(out, "runs", "".join(ch if ch.isalnum() else "-" for ch in name).strip("-") + f"-s{seed}")
            r = train_variant(run, progress=progress, store=store, data=corpus, student=student, epochs=plan.epochs,
                              batch_size=plan.batch_size, workers=plan.workers, lr=plan.lr, warmup_steps=4,
                              head_hidden=plan.head_hidden, log_every=5, seed=seed, **options)
            runs.append({"variant": name, "seed": seed, "run": run, "steps": r["steps"], "fit_seconds": r["fit_seconds"],
                         **run_scores(run, corpus, folds=plan.folds), **_fidelity(run)})
    same_steps([r for r in runs if r["variant"] not in PRETRAINED_VARIANTS])
    baselines = {"random-init student": random_init_student(runs[0]["run"], seed=0),
                 "EfficientNet-Lite0, untouched": spec_model(pretrained_student)}
    result = {"plan": asdict(plan), "environment": environment(), "runs": runs, "rows": summarize_teachers(runs),
              "baselines": {name: record(os.path.join(out, f"baseline-{i}.json"),
                                         lambda m=m: kfold_scores(**model_xy(m, corpus), folds=plan.folds))
                            for i, (name, m) in enumerate(baselines.items())},
              "teachers": {t: probe_store(store, corpus, ProbeOptions(seed=plan.seed), teacher=t)["top1"]
                           for t in ("effnet", "vit")}}
    return write_study(out, "teachers", result, format_teachers(result))


def _fidelity(run: str) -> dict:
    """Per teacher the mean cosine of head outputs to targets (summary, patch), kept in the run."""
    def make():
        return {"fidelity": {t: {"summary": v["summary_cos"], "patch": v["patch_cos"]}
                             for t, v in fidelity(run)["teachers"].items()}}
    return record(os.path.join(run, "teachers-fidelity.json"), make)


def _weights(run: str) -> dict:
    """The mean logged weight of each objective over the run (MGDA, DTO-KD, dropping)."""
    from kdcache.train.metrics import logged_weights, read_metrics
    from kdcache.train.rundir import RunDir
    weights = logged_weights(read_metrics(RunDir(run)))
    return {objective: sum(values) / len(values) for objective, values in weights.items()}


def summarize_teachers(runs: list[dict]) -> list[dict]:
    """One row per variant: mean ± sd over seeds of kNN, linear probe and each fidelity; the paired
    difference (same seed) to each of its references with a 95% t-interval."""
    by = {}
    for r in runs:
        by.setdefault(r["variant"], {})[r["seed"]] = r
    rows = []
    for variant, seeds in by.items():
        some = next(iter(seeds.values()))
        row = {"variant": variant, "options": TEACHER_VARIANTS[variant], "seeds": sorted(seeds), "steps": some["steps"],
               "knn": spread([r["knn"] for r in seeds.values()]), "linear": spread([r["linear"] for r in seeds.values()]),
               "fit_seconds": spread([r["fit_seconds"] for r in seeds.values()]),
               "fidelity": {t: {k: spread([r["fidelity"][t][k] for r in seeds.values()]) for k in ("summary", "patch")}
                            for t in some["fidelity"]},
               "weights": _mean_weights([_weights(r["run"]) for r in seeds.values()])}
        row["vs"] = {}
        for ref in TEACHER_REFERENCES.get(variant, ("static weights",)):
            if ref == variant or ref not in by:
                continue
            common = sorted(set(seeds) & set(by[ref]))
            row["vs"][ref] = {key: paired([seeds[s][key] for s in common], [by[ref][s][key] for s in common])
                              for key in ("knn", "linear")}
            row["vs"][ref].update({f"{t}/{k}": paired([seeds[s]["fidelity"][t][k] for s in common],
                                                      [by[ref][s]["fidelity"][t][k] for s in common])
                                   for t in some["fidelity"] if t in by[ref][common[0]]["fidelity"]
                                   for k in ("summary", "patch")})
        rows.append(row)
    return rows


def _mean_weights(per_seed: list[dict]) -> dict:
    keys = per_seed[0] if per_seed else {}
    return {k: sum(w[k] for w in per_seed) / len(per_seed) for k in keys}


def format_teachers(r: dict) -> str:
    p = r["plan"]
    ms = lambda s: f"{s['mean']:.3f} ± {s['sd']:.3f}"  # noqa: E731
    ci = lambda x: f"{x['mean']:+.3f} [{x['low']:+.3f}, {x['high']:+.3f}]"  # noqa: E731
    steps = sorted({row["steps"] for row in r["rows"]})
    lines = [f"# two teachers (effnet: EfficientNet-Lite0, 1280-d 7x7; vit: ViT-Ti/16 trained here, 192-d 4x4) -> "
             f"{p['student']}, {'/'.join(map(str, steps))} steps, {len(p['seeds'])} seeds per row (mean ± sd)",
             f"every labelled image scored once by {p['folds']}-fold kNN (k=20, T=0.07) and a {p['folds']}-fold linear "
             f"probe; fidelity: mean cosine of head outputs to targets (normalised space), eval view, training shards; "
             f"differences paired by seed, 95% t-intervals", "",
             "| variant | kNN | linear | effnet summary | effnet patch | vit summary | vit patch | fit s |",
             "|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        f = row["fidelity"]
        cell = lambda t, k: ms(f[t][k]) if t in f else "-"  # noqa: E731
        lines.append(f"| {row['variant']} | {ms(row['knn'])} | {ms(row['linear'])} | {cell('effnet', 'summary')} | "
                     f"{cell('effnet', 'patch')} | {cell('vit', 'summary')} | {cell('vit', 'patch')} | "
                     f"{row['fit_seconds']['mean']:.0f} |")
    for name, b in r["baselines"].items():
        lines.append(f"| {name} | {b['knn']:.3f} | {b['linear']:.3f} | - | - | - | - | - |")
    for t, top1 in r["teachers"].items():
        lines.append(f"| teacher {t}, cached (kNN, 80/20 split) | {top1:.3f} | - | - | - | - | - | - |")
    lines += ["", "| variant | against | kNN | linear | effnet summary | vit summary | vit patch |", "|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        for ref, d in row["vs"].items():
            cell = lambda k: ci(d[k]) if k in d else "-"  # noqa: E731
            lines.append(f"| {row['variant']} | {ref} | {cell('knn')} | {cell('linear')} | {cell('effnet/summary')} | "
                         f"{cell('vit/summary')} | {cell('vit/patch')} |")
    weighted = [row for row in r["rows"] if row["weights"]]
    if weighted:
        lines += ["", "mean weight per objective over the run (seeds averaged): " + "; ".join(
            f"{row['variant']}: " + ", ".join(f"{k} {v:.2f}" for k, v in row["weights"].items()) for row in weighted)]
    return "\n".join(lines)
