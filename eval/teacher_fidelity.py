"""``kdcache eval fidelity --store``: is what the store holds what its teacher computes?

For a seeded sample of a store's images (``samples``), every stored view is recomputed from
scratch, as a user checking a store they received would: the image's bytes read from the corpus
(where ``origin`` says, checked against its CRC-32), decoded at full size by PIL, the stored box
cut and resized with the teacher's interpolation (torchvision's ``resized_crop``, antialiased),
flipped as stored, normalised with the teacher's mean and std, and run through the teacher rebuilt
from the store's own metadata (its weights checked against the stored fingerprint). Reported per
teacher and view index: the cosine between the stored summary and patch tokens (codes decoded
with the store's codebooks) and the recomputed ones, mean and worst over the sample (patch: each
view's mean over its tokens). A store extracted with full-size decodes (the default) agrees to
float16 rounding; ``--decode reduced`` cuts each view from a smaller decode, and this says by how
much that moved the targets. ``kdcache verify --data --teacher-check N`` runs it too.
"""
from __future__ import annotations

import io
import random

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

from kdcache.data.corpus import ReadOptions, resolve_corpus
from kdcache.data.pixels import ShardPlaces, folder_files, read_rows, walked_places
from kdcache.data.walk import AlignError
from kdcache.errors import KdcacheError
from kdcache.models.spec import ModelSpecError
from kdcache.models.teacher import teacher_from_meta
from kdcache.store import Store
from kdcache.store.dtypes import to_float32
from kdcache.store.meta import feature_path
from kdcache.targets.decoding import stored_codebooks

CHECK_MIN_COS = 0.99  # `verify --teacher-check`: a float store whose worst view agrees less is a finding


def reference_crop(data: bytes, view: np.ndarray, size: tuple[int, int], interpolation: str) -> torch.Tensor:
    """The view as an independent reader cuts it: PIL's full-size decode, torchvision's resized_crop."""
    image = torch.from_numpy(np.array(Image.open(io.BytesIO(data)).convert("RGB"))).permute(2, 0, 1)
    h, w = image.shape[1:]
    t, l, ch, cw, flip = (float(x) for x in view)
    out = TF.resized_crop(image, round(t * h), round(l * w), max(1, round(ch * h)), max(1, round(cw * w)), list(size),
                          interpolation=InterpolationMode(interpolation), antialias=True)
    return out.flip(-1) if flip >= 0.5 else out


def _places(store: Store, corpus, shard: str) -> ShardPlaces:
    keys = store.keys(shard).tolist()
    origin = store.origin(shard)
    cshard = corpus.shard(shard)
    files = folder_files(cshard, keys) if corpus.kind == "folder" else ()
    if origin is not None:
        return ShardPlaces.from_origin(shard, keys, origin, files=files)
    return walked_places(corpus, cshard, keys, (store.shard_attrs(shard) or {}).get("failed", []))


def _stored(store: Store, shard: str, teacher: str, kind: str, rows: list[int]) -> np.ndarray:
    """(len(rows), K, ...) float32 of the stored targets (codes decoded with the store's codebooks)."""
    meta = store.meta.teachers[teacher]
    held = store.shard_attrs(shard)["digest"]
    if feature_path(teacher, kind) in held:
        a = np.concatenate(list(store.read_blocks(shard, feature_path(teacher, kind))))
        return to_float32(a[rows], meta.dtype)
    codes = np.concatenate(list(store.read_blocks(shard, feature_path(teacher, kind, codes=True))))[rows]
    cb = stored_codebooks(store, teacher)[kind]
    return cb.decode(codes)


@torch.inference_mode()
def teacher_fidelity(url: str, data: str, *, teacher: str | None = None, samples: int = 32, seed: int = 0,
                     weights: str | None = None, batch_size: int = 16, progress: bool = False) -> dict:
    store = Store.open(url)
    names = [teacher] if teacher else list(store.meta.teachers)
    unknown = [n for n in names if n not in store.meta.teachers]
    if unknown:
        raise KdcacheError(f"--teacher {unknown[0]}: not in {url} (teachers: {', '.join(store.meta.teachers)})")
    corpus = resolve_corpus(data, ReadOptions.from_dict(store.meta.corpus))
    if store.meta.corpus.get("fingerprint") != corpus.fingerprint():
        raise KdcacheError(f"{url} was extracted from another corpus than --data {data}")
    shards = [s for s in store.complete_shards() if s in {c.name for c in corpus.shards}]
    counts = {s: int(store.shard_summary(s)["count"]) for s in shards}
    every = [(s, r) for s in shards for r in range(counts[s])]
    chosen = sorted(random.Random(seed).sample(every, min(samples, len(every))))
    if not chosen:
        raise KdcacheError(f"{url}: no complete shard of --data {data} holds a sample")
    out = {"store": url, "data": data, "samples": len(chosen), "views": store.meta.views,
           "decode": "reduced" if store.meta.corpus.get("decode", {}).get("reduced") else "full", "teachers": {}}
    for name in names:
        meta = store.meta.teachers[name]
        if weights:
            import dataclasses
            meta = dataclasses.replace(meta, checkpoint=weights)
        try:
            live = teacher_from_meta(name, meta)
        except ModelSpecError as e:
            raise KdcacheError(f"teacher {name}: its weights cannot be loaded here, so the store cannot be checked "
                               f"against it ({e}); give them with --teacher-weights PATH") from None
        cls_cos, patch_cos = [[] for _ in range(store.meta.views)], [[] for _ in range(store.meta.views)]
        by_shard: dict[str, list[int]] = {}
        for s, r in chosen:
            by_shard.setdefault(s, []).append(r)
        for shard, rows in by_shard.items():
            places = _places(store, corpus, shard)

            def refuse(skip):
                raise AlignError(f"shard {shard}: sample {skip.key!r}: {skip.error}")
            images = read_rows(corpus, corpus.shard(shard), places, rows, handler=refuse)
            views = store.views(shard)
            stored = {kind: _stored(store, shard, name, kind, rows) for kind in ("cls", "patch")}
            crops, at = [], []
            for i, r in enumerate(rows):
                for v in range(store.meta.views):
                    crops.append(reference_crop(images[r].data, views[r, v], live.input_hw, meta.interpolation))
                    at.append((i, v))
            for b in range(0, len(crops), batch_size):
                summary, patches = live.features(torch.stack(crops[b:b + batch_size]).to(live.device))
                for j, (i, v) in enumerate(at[b:b + batch_size]):
                    cls_cos[v].append(float(F.cosine_similarity(summary[j].cpu(), torch.from_numpy(stored["cls"][i, v]),
                                                                dim=-1)))
                    patch_cos[v].append(float(F.cosine_similarity(patches[j].cpu(),
                                                                  torch.from_numpy(stored["patch"][i, v]), dim=-1).mean()))
        per_view = [{"view": v, "cls_mean": float(np.mean(cls_cos[v])), "cls_worst": float(np.min(cls_cos[v])),
                     "patch_mean": float(np.mean(patch_cos[v])), "patch_worst": float(np.min(patch_cos[v]))}
                    for v in range(store.meta.views)]
        out["teachers"][name] = {
            "model": meta.model, "stored_as": "codes" if (meta.quantizer or {}).get("patch") else meta.dtype,
            "views": per_view, "worst": min(min(v["cls_worst"], v["patch_worst"]) for v in per_view),
            "mean": float(np.mean([v["cls_mean"] for v in per_view] + [v["patch_mean"] for v in per_view]))}
    return out


def fidelity_problems(r: dict) -> list[str]:
    """``verify --teacher-check``: a float store extracted from full-size decodes (what it records)
    whose worst recomputed view agrees less than ``CHECK_MIN_COS`` is a finding. Codes are as close
    as their quantizer lets them be, and a store extracted with ``--decode reduced`` says it is not
    the teacher's exact answer: both are reported only."""
    if r["decode"] != "full":
        return []
    return [f"teacher {t}: worst cosine {v['worst']:.4f} between the stored targets and the teacher recomputed on "
            f"{r['samples']} sampled images (below {CHECK_MIN_COS}): the store is not this teacher's answer"
            for t, v in r["teachers"].items() if v["stored_as"] != "codes" and v["worst"] < CHECK_MIN_COS]


def format_teacher_fidelity(r: dict) -> str:
    lines = [f"# the teacher recomputed on {r['samples']} sampled images of {r['store']} (every stored view; decoded at "
             f"full size by PIL; the store was extracted with --decode {r['decode']})", "",
             "| teacher | stored as | view | CLS cos mean | CLS cos worst | patch cos mean | patch cos worst |",
             "|---|---|---|---|---|---|---|"]
    for t, v in r["teachers"].items():
        for row in v["views"]:
            lines.append(f"| {t} | {v['stored_as']} | {row['view']} | {row['cls_mean']:.4f} | {row['cls_worst']:.4f} | "
                         f"{row['patch_mean']:.4f} | {row['patch_worst']:.4f} |")
    return "\n".join(lines)
