"""``kdcache eval fidelity --store S --data D --derived ...``: what each way of deriving new views'
targets from a finite store costs in fidelity, measured against the teacher itself.

For each option (``targets.derive``) the store's samples stream through the training loader
exactly as a student would see them, but cut at the teacher's own input size and interpolation,
so "the student's pixels" are pixels the teacher can be run on: ``stored`` (a stored view, the
reference: only the storage dtype differs), ``sub-views`` (a box inside a stored view),
``cutmix`` and ``mixup`` (mixed across the batch), ``dense`` (a fresh view cut from the dense
map). The targets are derived as training derives them; the teacher, rebuilt from the store's
metadata (weights checked against the stored fingerprint), runs on the same (mixed) pixels; per
option the mean cosine between derived and live summary and patch tokens is reported (in the
teacher's own feature space). Give a store of images the students never trained on for held-out
figures.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from kdcache.data.corpus import ReadOptions, resolve_corpus
from kdcache.errors import KdcacheError
from kdcache.models.teacher import teacher_from_meta
from kdcache.store import Store
from kdcache.targets.decoding import TargetDecoder, stored_codebooks
from kdcache.targets.derive import draw_mix, mix_pixels, mix_targets
from kdcache.data.pixels import Crop
from kdcache.data.stream import SampleStream, StreamSpec, shard_rows
from kdcache.data.transport import collate

DERIVED = ("stored", "sub-views", "cutmix", "mixup", "dense")


@torch.inference_mode()
def derived_fidelity(url: str, data: str, *, options=DERIVED, teacher: str | None = None, samples: int = 256,
                     sub_views: float = 0.25, cutmix: float = 1.0, mixup: float = 1.0, epoch: int = 1, seed: int = 0,
                     batch_size: int = 16, progress: bool = False) -> dict:
    unknown = [o for o in options if o not in DERIVED]
    if unknown:
        raise KdcacheError(f"--derived {unknown[0]!r}: expected one of {', '.join(DERIVED)}")
    store = Store.open(url)
    name = teacher or next(iter(store.meta.teachers))
    if name not in store.meta.teachers:
        raise KdcacheError(f"--teacher {name}: not in {url} (teachers: {', '.join(store.meta.teachers)})")
    meta = store.meta.teachers[name]
    if "dense" in options and not meta.dense:
        raise KdcacheError(f"--derived dense: teacher {name} of {url} has no dense maps (extract it with --dense-scale S)")
    if meta.tokens < 2 and set(options) & {"sub-views", "cutmix", "dense"}:
        raise KdcacheError(f"--derived: teacher {name} of {url} has a {meta.grid[0]}x{meta.grid[1]} patch grid; boxes "
                           f"need a grid to cut")
    live = teacher_from_meta(name, meta)
    corpus = resolve_corpus(data, ReadOptions.from_dict(store.meta.corpus))
    shards = tuple(s for s in store.complete_shards([name]) if s in {c.name for c in corpus.shards})
    if not shards:
        raise KdcacheError(f"--data {data}: no shard of it is complete in {url}")
    out = {"store": url, "teacher": name, "samples": 0, "options": {}}
    for option in options:
        dense = option == "dense"
        decoder = TargetDecoder(name, meta, codebooks=stored_codebooks(store, name), normalize="none", stats=None,
                                dense=dense)
        spec = StreamSpec(shards=shard_rows(store, shards), crops=(("image", Crop(live.input_hw, meta.interpolation)),),
                          decode=corpus.options.decode, view_choice="augmented" if store.meta.views > 1 else "first",
                          stored_views=store.meta.views, policy=store.meta.view_policy, seed=seed, shuffle=False,
                          store_url=url, target_paths=tuple(decoder.read_paths),
                          sub_views=sub_views if option == "sub-views" else 0.0, dense_views=dense)
        stream = SampleStream(spec, corpus, epoch=epoch)
        sums = {"summary": [0.0, 0], "patch": [0.0, 0]}
        seen = 0
        for step, batch in enumerate(DataLoader(stream, batch_size=batch_size, collate_fn=collate)):
            images = batch["image"]
            derived = decoder(batch)
            if option in ("cutmix", "mixup"):
                mix = draw_mix(len(images), cutmix=cutmix if option == "cutmix" else 0.0,
                               mixup=mixup if option == "mixup" else 0.0, grid=tuple(meta.grid), seed=seed, step=step,
                               device=images.device)
                if mix is None:  # (a one-sample batch: nothing to mix with)
                    continue
                images, derived = mix_pixels(images, mix), mix_targets(derived, mix, tuple(meta.grid))
            summary, patches = live.features(images.to(live.device))
            if derived.get("summary") is not None:
                _add(sums["summary"], derived["summary"], summary)
            _add(sums["patch"], derived["patch"], patches)
            seen += len(images)
            if seen >= samples:
                break
        out["samples"] = max(out["samples"], seen)
        out["options"][option] = {k: (v[0] / v[1] if v[1] else None) for k, v in sums.items()}
        out["options"][option]["samples"] = seen
    return out


def _add(acc: list, derived: torch.Tensor, live: torch.Tensor) -> None:
    cos = F.cosine_similarity(derived.float().cpu(), live.float().cpu(), dim=-1)
    acc[0] += float(cos.sum())
    acc[1] += cos.numel()


def format_derived(r: dict) -> str:
    f = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    lines = [f"# derived targets of {r['teacher']} in {r['store']}, against the teacher run on the same pixels",
             "", "| option | samples | summary cos | patch cos |", "|---|---|---|---|"]
    lines += [f"| {o} | {v['samples']} | {f(v['summary'])} | {f(v['patch'])} |" for o, v in r["options"].items()]
    return "\n".join(lines)

