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
from dataclasses import asdict, dataclass

import torch

from kdcache.data.corpus import resolve_corpus
from kdcache.data.decode import BadImage, decode_sample
from kdcache.data.demo_corpus import build_demo_corpus
from kdcache.data.walk import Skip, label_classes, screen
from kdcache.extract import ExtractOptions, extract
from kdcache.models.convert import shipped_teacher

from .bench_quality import knn_protocol, same_steps, train_variant, write_study
from .fidelity import fidelity
from .harness import environment
from .model_features import knn_on_model
from .store_features import knn_on_store

VIT_TEACHER = "vit_tiny_patch16_224"
VIT_KWARGS = dict(img_size=64, depth=4)

VARIANTS = {  # name -> train options
    "static weights": {},
    "PHI-S": {"normalize": "phi-s"},
    "--balance mgda": {"balance": "mgda"},
    "--teacher-drop 0.5": {"teacher_drop": 0.5},
    "--head transformer": {"head": "transformer", "head_depth": 2, "head_heads": 4},
    "--shared-adapter": {"shared_adapter": True},
    "task loss (static, weight 1)": {"task_loss": "ce"},
    "task loss + --balance mgda": {"task_loss": "ce", "balance": "mgda"},
}


@dataclass(frozen=True)
class TeachersPlan:
    student: str = "resnet18,img_size=64"
    epochs: int = 8
    batch_size: int = 32
    views: int = 2
    digits: int = 600
    photos: int = 120
    vit_epochs: int = 30
    lr: float = 2e-3
    head_hidden: int = 256
    workers: int = 1
    seed: int = 0


def train_vit_teacher(corpus: str, out: str, *, epochs: int, seed: int = 0) -> str:
    """A small ViT trained here, supervised on the corpus labels (centre crops at 64 px, random
    flips): a second teacher with features of its own. Its checkpoint, kept in ``out``."""
    import safetensors.torch
    import timm
    import torch.nn.functional as F
    if os.path.exists(out):
        return out
    c = resolve_corpus(corpus)
    images, labels = [], []
    for shard in c.shards:
        for s in screen(c.samples(shard)):
            if isinstance(s, Skip) or s.label is None:
                continue
            try:
                rgb = torch.from_numpy(decode_sample(s)).permute(2, 0, 1).float() / 255
            except BadImage:
                continue
            images.append(F.interpolate(rgb[None], size=(64, 64), mode="bilinear", antialias=True, align_corners=False)[0])
            labels.append(s.label)
    x, y = torch.stack(images), torch.tensor(labels)
    x = (x - 0.5) / 0.5  # the ViT's data config: mean = std = 0.5
    torch.manual_seed(seed)
    model = timm.create_model(VIT_TEACHER, pretrained=False, num_classes=int(y.max()) + 1, **VIT_KWARGS)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    steps = epochs * ((len(x) + 63) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    from tqdm import tqdm
    for _ in tqdm(range(epochs), desc="train the ViT teacher", unit="epoch", dynamic_ncols=True):
        for idx in torch.randperm(len(x), generator=gen).split(64):
            xb = x[idx]
            flip = torch.rand(len(idx), generator=gen) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    os.makedirs(os.path.dirname(out), exist_ok=True)
    safetensors.torch.save_file(model.state_dict(), out)
    return out


def teachers_study(out: str, plan: TeachersPlan = TeachersPlan(), *, variants=None, progress: bool = True) -> dict:
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
    for name in variants or VARIANTS:
        run = os.path.join(out, "run-" + "".join(ch if ch.isalnum() else "-" for ch in name).strip("-"))
        r = train_variant(run, progress=progress, store=store, data=corpus, student=plan.student, epochs=plan.epochs,
                          batch_size=plan.batch_size, workers=plan.workers, lr=plan.lr, warmup_steps=4,
                          head_hidden=plan.head_hidden, log_every=5, seed=plan.seed, **VARIANTS[name])
        knn = knn_on_model("run", corpus, run=run, seed=plan.seed)
        fid = fidelity(run)["teachers"]
        rows.append({"variant": name, "options": VARIANTS[name], "steps": r["steps"], "fit_seconds": r["fit_seconds"],
                     "top1": knn["top1"], "top5": knn["top5"],
                     "fidelity": {t: {"summary": v["summary_cos"], "patch": v["patch_cos"]} for t, v in fid.items()}})
    steps = same_steps(rows)
    random_init = knn_on_model("model", corpus, model=plan.student, seed=plan.seed)
    teacher_knn = {t: knn_on_store(store, corpus, teacher=t, seed=plan.seed) for t in ("effnet", "vit")}
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
