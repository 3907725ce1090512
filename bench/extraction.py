"""``kdcache bench extract``: is extraction bound by the teacher, as it should be?

Two sides, interleaved in one process (``bench.harness``): (1) the bare teacher forward on
pre-decoded, pre-cropped uint8 batches of the same shape, with the outputs cast to the storage
dtype and moved to the host exactly as the pipeline moves them; (2) the ``kdcache extract``
pipeline loop (read tar, decode, crop in a DataLoader worker, forward, compress, write) into a
fresh store. (2)/(1) per round is the fraction of the teacher's speed the pipeline keeps
(target >= 0.90); it cannot exceed 1 except by noise, and the output says so when it does.
With ``--decodes``: the pipeline with ``--decode reduced`` too, and each decode's store against
the teacher recomputed from full-size decodes (``eval fidelity --store``): what the faster decode
costs the targets. With ``--quantize``: (3) the torch encoder that ``extract --quantize`` runs after each forward,
on the teacher's own patch features (on its device, a quantizer fit on them), in tokens/s;
encode tok/s / teacher tok/s >= 1 means encoding never sets the pace.
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile

import torch

from kdcache.data.corpus import resolve_corpus
from kdcache.data.demo_corpus import build_demo_corpus
from kdcache.data.pixels import Crop, view_pixels
from kdcache.data.views import view_at
from kdcache.data.walk import fail_on_skip, screened
from kdcache.extract.options import ExtractOptions
from kdcache.extract.run import extract
from kdcache.models.teacher import create_teacher
from kdcache.store.meta import ViewPolicy
from kdcache.targets.decoding import TORCH_DTYPES

from .harness import Spread, Timed, environment, header, limit_note, measure
from .options import ExtractBench


def _predecoded(corpus_dir: str, teacher) -> list[torch.Tensor]:
    """The teacher's eval-view crops of every image, decoded and cut by the pipeline's own stage."""
    corpus = resolve_corpus(corpus_dir)
    policy = ViewPolicy.for_input(teacher.data.crop_pct, teacher.data.hw)
    out = []
    for shard in corpus.shards:
        fail = fail_on_skip(shard)  # the bench's own corpus: every image decodes
        for item in view_pixels(screened(corpus, shard, fail), views=lambda s, h, w: view_at(policy, s.key, 0, h, w),
                                crops=[Crop(teacher.input_hw, teacher.meta.interpolation)], decode=corpus.options.decode,
                                handler=fail):
            out.append(item.crops[0][0])
    return out


ENCODE = "torch encoder on the teacher's patches"
PIPELINE = "kdcache extract (pipeline loop)"
REDUCED = "kdcache extract --decode reduced (pipeline loop)"


def _worst(r: dict, kind: str) -> str:
    return f"{min(v[f'{kind}_worst'] for v in r['views']):.4f}"
SOFT = "kdcache extract --logits (pipeline loop)"


def _encoder_on_patches(t, batches, quantize: str, dtype):
    """The teacher's patch features of the bench images, as ``extract --quantize`` encodes them
    (storage dtype, back to float, on the teacher's device), and an encoder fit on them."""
    from kdcache.quantize.encoder import TorchEncoder
    from kdcache.quantize.methods import fit
    from kdcache.quantize.quantizer_spec import QuantizerSpec
    with torch.inference_mode():
        feats = [t.features(b.to(t.device))[1].to(dtype).float() for b in batches]
    patches = torch.cat(feats).reshape(-1, feats[0].shape[-1])
    cb = fit(QuantizerSpec.parse(quantize), patches.cpu().numpy())
    return patches, TorchEncoder(cb, t.device)


def forward_threads(threads: int, workers: int) -> int:
    """The teacher forward's torch threads: as given, or the cores the decode workers leave."""
    return threads or max(1, (os.cpu_count() or 1) - workers)


def bench_extract(o: ExtractBench = ExtractBench()) -> str:
    teacher, images, batch_size, workers, codec, quantize = o.teacher, o.images, o.batch_size, o.workers, o.codec, o.quantize
    repeat, as_json = o.repeat, o.as_json
    threads_before = torch.get_num_threads()
    # both sides with the same threads, none of them on the decode workers' cores: otherwise the
    # workers and the forward preempt each other and the ratio moves run to run (0.88-0.96 seen)
    torch.set_num_threads(forward_threads(o.threads, workers))
    try:
        return _bench_extract(o, teacher, images, batch_size, workers, codec, quantize, repeat, as_json)
    finally:
        torch.set_num_threads(threads_before)


def _bench_extract(o, teacher, images, batch_size, workers, codec, quantize, repeat, as_json) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        build_demo_corpus(f"{tmp}/corpus", digits=0, photos=images, shard_size=32)
        t = create_teacher(teacher)
        crops = _predecoded(f"{tmp}/corpus", t)
        batches = [torch.stack(crops[i:i + batch_size]) for i in range(0, len(crops), batch_size)]
        opts = ExtractOptions(batch_size=batch_size, workers=workers, codec=codec, progress=False, views=o.views)
        dtype = TORCH_DTYPES[opts.dtype]
        runs = iter(range(1 << 30))

        def bare():
            for b in batches:
                summary, patches = t.features(b.to(t.device, non_blocking=True))
                summary.to(dtype).to("cpu"), patches.to(dtype).to("cpu")
            return len(crops)

        def pipeline():
            last[PIPELINE] = os.path.join(tmp, f"store-{next(runs)}.zarr")
            s = extract(f"{tmp}/corpus", last[PIPELINE], [teacher], opts)
            return Timed(s.images, s.seconds)

        sides = {"bare teacher forward": bare, "kdcache extract (pipeline loop)": pipeline}
        items = {"bare teacher forward": len(crops)}
        last = {}  # side -> the store its last repetition wrote (--decodes: its fidelity)
        if o.decodes:
            reduced_opts = dataclasses.replace(opts, decode="reduced")

            def reduced_pipeline():
                last[REDUCED] = os.path.join(tmp, f"store-{next(runs)}.zarr")
                s = extract(f"{tmp}/corpus", last[REDUCED], [teacher], reduced_opts)
                return Timed(s.images, s.seconds)
            sides[REDUCED] = reduced_pipeline
        if o.logits:
            soft_opts = dataclasses.replace(opts, logits=o.logits)

            def soft_pipeline():
                s = extract(f"{tmp}/corpus", os.path.join(tmp, f"store-{next(runs)}.zarr"), [teacher], soft_opts)
                return Timed(s.images, s.seconds)
            sides[SOFT] = soft_pipeline
        if quantize:
            patches, enc = _encoder_on_patches(t, batches, quantize, dtype)
            tokens = patches.shape[0]

            def encode():
                enc(patches)
                if t.device.type == "cuda":
                    torch.cuda.synchronize()
            sides[ENCODE] = encode
            items[ENCODE] = tokens
        m = measure(sides, repeat=repeat, items=items)
        fidelity = {}
        if o.decodes:  # the stores each decode wrote, against the teacher recomputed from full-size decodes
            from kdcache.eval.teacher_fidelity import teacher_fidelity
            for side in (PIPELINE, REDUCED):
                r = teacher_fidelity(last[side], f"{tmp}/corpus", samples=o.fidelity_samples)
                fidelity[side] = next(iter(r["teachers"].values()))
    env = environment(str(t.device))
    ratio = m.ratio("kdcache extract (pipeline loop)", "bare teacher forward")
    enc_line = []
    if quantize:
        # per round: encoded tokens/s over the teacher's tokens/s (img/s x tokens per image)
        r = m.ratio(ENCODE, "bare teacher forward")  # tokens/s over images/s
        enc_ratio = Spread(r.median / t.meta.tokens, r.low / t.meta.tokens, r.high / t.meta.tokens)
        enc_line = [f"| torch encoder {quantize} on the teacher's patch features ({t.meta.tokens} tokens/img; "
                    f"{m.rate(ENCODE).fmt(0)} tok/s) | {m.rate(ENCODE).fmt(1, scale=1 / t.meta.tokens)} | "
                    f"encode/teacher {enc_ratio.fmt(2)} |",
                    "", f"encode tok/s / teacher tok/s {enc_ratio.fmt(2)} (target >= 1: encoding never sets the pace)"]
    decode_lines = []
    if o.decodes:
        full, red = fidelity[PIPELINE], fidelity[REDUCED]
        gain = m.ratio(REDUCED, PIPELINE)
        decode_lines = [
            "", f"extraction's decode against the teacher's own answer (every view of {o.fidelity_samples} images "
                f"recomputed from PIL's full-size decode: eval fidelity --store)", "",
            "| --decode | img/s | / bare forward | / --decode full | CLS cos worst | patch cos worst | mean cos |",
            "|---|---|---|---|---|---|---|",
            f"| full (default) | {m.rate(PIPELINE).fmt(1)} | {ratio.fmt(2)} | 1.00 | {_worst(full, 'cls')} | "
            f"{_worst(full, 'patch')} | {full['mean']:.4f} |",
            f"| reduced | {m.rate(REDUCED).fmt(1)} | {m.ratio(REDUCED, 'bare teacher forward').fmt(2)} | {gain.fmt(2)} | "
            f"{_worst(red, 'cls')} | {_worst(red, 'patch')} | {red['mean']:.4f} |"]
    soft_line = []
    if o.logits:
        soft_ratio = m.ratio(SOFT, "kdcache extract (pipeline loop)")
        soft_line = [f"| kdcache extract --logits {o.logits}, pipeline loop | {m.rate(SOFT).fmt(1)} | "
                     f"{m.ratio(SOFT, 'bare teacher forward').fmt(2)} |",
                     "", f"with --logits {o.logits} / without: {soft_ratio.fmt(3)} (the soft labels' cost to extraction)"]
    if as_json:
        return json.dumps({"environment": env, "teacher": t.meta.model, "images": images, "batch_size": batch_size,
                           "workers": workers, "codec": codec, "quantize": quantize, "logits": o.logits,
                           "measurement": m.to_dict(), "ratio": ratio.to_dict(),
                           "logits_over_plain": soft_ratio.to_dict() if o.logits else None,
                           "decodes": {"reduced_over_full": m.ratio(REDUCED, PIPELINE).to_dict(),
                                       "fidelity": {"full": fidelity[PIPELINE], "reduced": fidelity[REDUCED]}}
                           if o.decodes else None,
                           "encode_over_teacher": enc_ratio.to_dict() if quantize else None}, indent=2)
    lines = [header(f"bench extract: {t.meta.model} {t.meta.input_size[1]}x{t.meta.input_size[2]}, {images} images, "
                    f"batch {batch_size}, {workers} worker(s), codec {codec}"
                    + (f", {o.views} views per image on the pipeline sides" if o.views > 1 else ""), env, repeat=repeat,
                    warmup=m.warmup), "",
             "| side | img/s | ratio to bare forward |", "|---|---|---|",
             f"| bare teacher forward (pre-decoded tensors, same output copies) | {m.rate('bare teacher forward').fmt(1)} | 1.00 |",
             f"| kdcache extract, pipeline loop | {m.rate('kdcache extract (pipeline loop)').fmt(1)} | {ratio.fmt(2)} |",
             *enc_line[:1], *soft_line[:1], "", f"ratio {ratio.fmt(2)} (target >= 0.90; ratios are round by round)",
             *enc_line[2:], *soft_line[2:], *decode_lines]
    note = limit_note(ratio, "pipeline/bare")
    return "\n".join(lines + ([note] if note else []))
