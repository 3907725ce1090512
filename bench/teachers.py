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
from kdcache.data.pixels import WHOLE_IMAGE, Crop, view_pixels
from kdcache.data.walk import label_classes, record_to, screened
from kdcache.eval.head_fidelity import fidelity
from kdcache.eval.model_features import probe_model
from kdcache.eval.options import ProbeOptions
from kdcache.eval.store_features import probe_store
from kdcache.extract.options import ExtractOptions
from kdcache.extract.run import extract
from kdcache.models.convert_weights import shipped_teacher

from .harness import environment
from .options import TEACHER_VARIANTS, TeachersPlan
from .studies import knn_protocol, same_steps, train_variant, write_study

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
    build_demo_corpus(corpus, digits=plan.digits, photos=plan.photos)
    vit_ckpt = train_vit_teacher(corpus, os.path.join(out, "teacher", "vit_digits.safetensors"), epochs=plan.vit_epochs,
                                 seed=plan.seed)
    classes = label_classes(resolve_corpus(corpus))
    teachers = [shipped_teacher(out), f"vit={VIT_TEACHER},pretrained=false,img_size=64,depth=4,num_classes={classes},"
                                      f"checkpoint={vit_ckpt}"]
    store = os.path.join(out, "store.zarr")
    extract(corpus, store, teachers, ExtractOptions(views=plan.views, seed=plan.seed, batch_size=32, workers=plan.workers,
                                                    progress=progress))
    rows = []
    for name in plan.variants:
        run = os.path.join(out, "run-" + "".join(ch if ch.isalnum() else "-" for ch in name).strip("-"))
        r = train_variant(run, progress=progress, store=store, data=corpus, student=plan.student, epochs=plan.epochs,
                          batch_size=plan.batch_size, workers=plan.workers, lr=plan.lr, warmup_steps=4,
                          head_hidden=plan.head_hidden, log_every=5, seed=plan.seed, **TEACHER_VARIANTS[name])
        knn = probe_model("run", corpus, ProbeOptions(seed=plan.seed), run=run)
        fid = fidelity(run)["teachers"]
        rows.append({"variant": name, "options": TEACHER_VARIANTS[name], "steps": r["steps"], "fit_seconds": r["fit_seconds"],
                     "top1": knn["top1"], "top5": knn["top5"],
                     "fidelity": {t: {"summary": v["summary_cos"], "patch": v["patch_cos"]} for t, v in fid.items()}})
    steps = same_steps(rows)
    random_init = probe_model("model", corpus, ProbeOptions(seed=plan.seed), model=plan.student)
    teacher_knn = {t: probe_store(store, corpus, ProbeOptions(seed=plan.seed), teacher=t) for t in ("effnet", "vit")}
    result = {"plan": asdict(plan), "environment": environment(), "steps": steps, "rows": rows,
              "random_init": {"top1": random_init["top1"], "top5": random_init["top5"]},
              "teachers": {t: {"top1": k["top1"], "top5": k["top5"]} for t, k in teacher_knn.items()},
              "protocol": knn_protocol(random_init)}
    return write_study(out, "teachers", result, format_teachers(result))


def format_teachers(r: dict) -> str:
    p, pr = r["plan"], r["protocol"]
    lines = [f"# two teachers (effnet: EfficientNet-Lite0, 1280-d 7x7; vit: ViT-Ti/16 trained here, 192-d 4x4) -> "
             f"{p['student']}, {r['steps']} steps each",
             f"kNN k={pr['k']}, T={pr['temperature']}, {pr['n_train']} train / {pr['n_val']} val; fidelity: mean cosine of "
             f"head outputs to the targets (normalised space), eval view, training shards", "",
             "| variant | kNN top-1 | top-5 | effnet summary | effnet patch | vit summary | vit patch | fit s |",
             "|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        f = row["fidelity"]
        lines.append(f"| {row['variant']} | {row['top1']:.3f} | {row['top5']:.3f} | {f['effnet']['summary']:.3f} | "
                     f"{f['effnet']['patch']:.3f} | {f['vit']['summary']:.3f} | {f['vit']['patch']:.3f} | "
                     f"{row['fit_seconds']:.0f} |")
    lines.append(f"| random-init student | {r['random_init']['top1']:.3f} | {r['random_init']['top5']:.3f} | - | - | - | - | - |")
    for t, k in r["teachers"].items():
        lines.append(f"| teacher {t}, cached | {k['top1']:.3f} | {k['top5']:.3f} | - | - | - | - | - |")
    return "\n".join(lines)
