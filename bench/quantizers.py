"""``kdcache bench quantize``: bytes per token vs fidelity, for every method and M, one run.

Features come from a store (a teacher's float patches, sampled as ``kdcache quantize`` would),
a ``.npy`` (N, D) matrix, or MiniLM token features (real pretrained, high rank; needs the
``bench`` extra). Held-out tokens are never trained on.
"""
from __future__ import annotations

import json
import time

import numpy as np

from kdcache.quantize.encoder import TorchEncoder
from kdcache.quantize.methods import encode, faiss_encode, fit, refine_codebooks
from kdcache.quantize.quantizer_spec import QuantizeError, QuantizerSpec
from kdcache.quantize.reconstruction import measure as measure_fidelity
from kdcache.quantize.reconstruction import reconstruction_fidelity
from kdcache.targets.sample import SampleSpec

from .harness import environment, header, measure
from .options import QUANTIZE_METHODS, QuantizeBench


def load_features(*, store: str | None = None, teacher: str | None = None, npy: str | None = None,
                  minilm: int | None = None, effnet: bool = False, train_tokens: int = 65536, seed: int = 0,
                  cross_source: bool = False, work_dir: str = ".kdcache-bench"):
    """(train, held_out, description). ``cross_source`` (MiniLM, EfficientNet): the held-out
    tokens come from another source than the training ones (texts: sklearn's dataset docs vs the
    stdlib's docstrings; images: sklearn's photos vs scikit-image's)."""
    if store:
        from kdcache.store import Store
        from kdcache.targets.sample import draw, training_prefix
        s = Store.open(store)
        teacher = teacher or next(iter(s.meta.teachers))
        spec = SampleSpec(train_tokens=train_tokens, seed=seed)
        shards, _ = training_prefix(s, teacher, "patch", spec)
        train, held, _ = draw(s, teacher, "patch", shards, spec)
        return train, held, f"store {store}, teacher {teacher} ({s.meta.teachers[teacher].model}) patch tokens"
    if effnet:
        from .image_features import effnet_patch_features
        held_n = min(8192, max(256, train_tokens // 4))
        if cross_source:
            train = effnet_patch_features("skimage", train_tokens, work_dir=work_dir, seed=seed)
            held = {"sklearn photos": effnet_patch_features("sklearn", held_n, work_dir=work_dir, seed=seed + 1)}
            return train, held, ("EfficientNet-Lite0 (ImageNet-pretrained) 1280-d patch features: trained on crops of "
                                 "scikit-image's sample images, held out on crops of scikit-learn's two photos")
        x = effnet_patch_features("skimage", train_tokens + held_n, work_dir=work_dir, seed=seed)
        return x[held_n:], x[:held_n], "EfficientNet-Lite0 1280-d patch features of scikit-image crops"
    if npy:
        x, what = np.load(npy).astype(np.float32), f"{npy}"
    else:
        from .text_features import minilm_token_features
        if cross_source:
            rng = np.random.default_rng(seed)
            train = minilm_token_features(minilm or 1600, source="stdlib-even")
            train = train[rng.permutation(len(train))[:train_tokens]]
            held = {}
            for name, src in (("other stdlib modules", "stdlib-odd"), ("sklearn dataset docs", "sklearn")):
                h = minilm_token_features(10 ** 6, source=src)
                held[name] = h[rng.permutation(len(h))[:4096]]
            return train, held, (f"MiniLM-L6 (all-MiniLM-L6-v2) token features: trained on docstrings of {minilm or 1600} "
                                 f"paragraphs of half the stdlib modules; held out on the other modules' docstrings and "
                                 f"on scikit-learn's dataset descriptions")
        x, what = minilm_token_features(minilm or 1600), f"MiniLM-L6 (all-MiniLM-L6-v2) token features, {minilm or 1600} real texts"
    idx = np.random.default_rng(seed).permutation(len(x))
    held = min(8192, len(x) // 8)
    return x[idx[held:held + train_tokens]], x[idx[:held]], what


def bench_quantize(train: np.ndarray, held: np.ndarray, *, what: str, methods=QUANTIZE_METHODS, fractions=(64, 32, 16),
                   beam: int = 4, refine: int = 0, seed: int = 0, repeat: int = 5, log=print, as_json: bool = False) -> str:
    """One row per (method, M): M = fp16 bytes / fraction; sq8/sq4 have a fixed M. ``METHOD+norm``
    is the gain-shape variant (the norm byte counts in M; product methods take the largest M
    within the budget whose M-1 codebooks divide D). Every quantizer is trained once; encoding
    the held-out tokens is timed with the harness, all quantizers interleaved."""
    d = train.shape[1]
    rows, fitted = [], []  # rows: (name, M or None, error) in table order
    for name in methods:
        method, _, variant = name.partition("+")
        norm = int(variant == "norm")
        if variant not in ("", "norm"):
            rows.append((name, None, f"unknown variant {variant!r} (METHOD or METHOD+norm)"))
            continue
        ms = [None] if method in ("sq8", "sq4") else sorted({_budget_m(method, max(1, 2 * d // f), d, norm) for f in fractions})
        for m in ms:
            try:
                spec = QuantizerSpec(method=method, m=m, beam=beam, norm=norm, refine=refine if method == "rq" else 0)
                m_eff = spec.resolve_m(d)
            except QuantizeError as e:  # e.g. M does not divide D: say so in the table
                rows.append((name, m, str(e)))
                continue
            t0 = time.perf_counter()
            cb = fit(spec, train, seed=seed)
            key = f"{name} M={m_eff}"
            fitted.append((key, name, m_eff, cb, time.perf_counter() - t0, measure_fidelity(cb, held)))
            rows.append((name, key, None))
            log(f"trained {key} in {fitted[-1][4]:.1f} s")
    devices = encode_devices()
    runs = {}
    for key, _, _, cb, _, _ in fitted:
        runs[f"{key} faiss"] = lambda cb=cb: faiss_encode(cb, held)
        for dev in devices:
            runs[f"{key} torch {dev}"] = _torch_run(cb, held, dev)
    m = measure(runs, repeat=repeat, items={k: len(held) for k in runs}) if runs else None
    by_key = {f[0]: f for f in fitted}
    env = environment()
    if as_json:
        return json.dumps({"environment": env, "features": what, "dim": d, "train_tokens": len(train), "held_out": len(held),
                           "beam": beam, "refine": refine, "measurement": m.to_dict() if m else None,
                           "rows": [{"method": f[1], "m": f[2], "train_seconds": f[4], **f[5]} for f in fitted],
                           "errors": [{"method": n, "m": mm, "error": e} for n, mm, e in rows if e]}, indent=2)
    table = []
    for name, key, error in rows:
        if error:
            table.append(f"| {name} | {key or '-'} | - | - | - | - | {' | '.join('-' for _ in devices)} | - | - | - | - | {error} |")
            continue
        _, _, m_eff, cb, secs, f = by_key[key]
        torch_cols = " | ".join(m.rate(f"{key} torch {dev}").fmt(0) for dev in devices)
        ratio = m.ratio(f"{key} torch cpu", f"{key} faiss")
        table.append(f"| {name} | {m_eff} | {m_eff} | 1/{2 * d / m_eff:.0f} | {secs:.1f} | {m.rate(f'{key} faiss').fmt(0)} | "
                     f"{torch_cols} | {ratio.fmt(2)} | {f['relmse']:.4f} | {f['mean_cos']:.4f} | {f['p5_cos']:.4f} | |")
    head = [header(f"bench quantize: {what}", env, repeat=repeat, warmup=1 if m else 0),
            f"D={d}, fp16 = {2 * d} bytes/token; {len(train)} training tokens, {len(held)} held-out tokens; rq beam {beam}, "
            f"refine {refine}; encode tok/s is median (min-max) of faiss's encoder and kdcache's torch encoder on each "
            f"device present, all interleaved; fidelity (of the torch codes) is deterministic", "",
            "| method | M | bytes/token | of fp16 | train s | faiss encode tok/s | "
            + " | ".join(f"torch {dev} tok/s" for dev in devices) + " | torch cpu / faiss | relMSE (centred) | mean cos | p5 cos | note |",
            "|---|---|---|---|---|---|" + "---|" * len(devices) + "---|---|---|---|---|"]
    return "\n".join(head + table)


def encode_devices() -> list[str]:
    import torch
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _torch_run(cb, held, device):
    """A timed call of the torch encoder on ``device`` (features already there, codes left there)."""
    import torch
    enc = TorchEncoder(cb, device)
    x = torch.from_numpy(held).to(device)

    def run():
        enc(x)
        if device == "cuda":
            torch.cuda.synchronize()
    return run


def fidelity_curve(train: np.ndarray, held: np.ndarray | dict, *, what: str, fractions=(16, 32), beams=(8, 16, 32),
                   refines=(0, 2, 4), norm: int = 1, seed: int = 0, log=print, as_json: bool = False) -> str:
    """rq (gain-shape by default) at each fraction of fp16: greedy faiss training once, then for
    each beam the refinement rounds continued in place (refine 4 = refine 2 plus 2 more rounds,
    each round encoding the training sample at that beam), held-out mean and p5 cosine at every
    point (``held``: one array, or several named held-out sets). What fast encoding buys: wide
    beams and refinement that faiss's encoder made costly."""
    d = train.shape[1]
    helds = held if isinstance(held, dict) else {"held-out": held}
    rows = []
    for frac in fractions:
        m = _budget_m("rq", max(1, 2 * d // frac), d, norm)
        t0 = time.perf_counter()
        base = fit(QuantizerSpec(method="rq", m=m, norm=norm), train, seed=seed)
        train_s = time.perf_counter() - t0
        log(f"1/{frac}: M={m}, greedy rq trained in {train_s:.0f} s")
        for beam in beams:
            cb, done, refine_s = base, 0, 0.0
            for r in sorted(refines):
                if r > done:
                    t0 = time.perf_counter()
                    cb = refine_codebooks(cb, train, rounds=r - done, beam=beam)
                    refine_s += time.perf_counter() - t0
                    done = r
                for name, h in helds.items():
                    t0 = time.perf_counter()
                    codes = encode(cb, h, beam=beam)
                    enc_s = time.perf_counter() - t0
                    f = reconstruction_fidelity(h, cb.decode(codes))
                    rows.append({"held_out": name, "fraction": frac, "m": m, "beam": beam, "refine": r,
                                 "train_seconds": round(train_s, 1), "refine_seconds": round(refine_s, 1),
                                 "encode_tok_s": round(len(h) / enc_s), **f})
                    log(f"1/{frac} beam {beam} refine {r} {name}: mean cos {f['mean_cos']:.4f}, p5 {f['p5_cos']:.4f} "
                        f"(refined {refine_s:.0f} s, encode {len(h) / enc_s:.0f} tok/s)")
    if as_json:
        return json.dumps({"environment": environment(), "features": what, "dim": d, "train_tokens": len(train),
                           "held_out": {k: len(v) for k, v in helds.items()}, "norm": norm, "rows": rows}, indent=2)
    sizes = ", ".join(f"{name} {len(h)}" for name, h in helds.items())
    head = [header(f"bench quantize --curve: {what}", environment(), repeat=1, warmup=0),
            f"D={d}; rq{'+norm' if norm else ''}; {len(train)} training tokens; held-out tokens (never trained on, other "
            f"texts/images): {sizes}; refine seconds are cumulative per beam; encode tok/s is the held-out encode "
            f"(torch, cpu, one run)", "",
            "| held out | of fp16 | M | beam | refine | mean cos | p5 cos | relMSE | train s (greedy, faiss) | refine s | encode tok/s |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    table = [f"| {r['held_out']} | 1/{r['fraction']} | {r['m']} | {r['beam']} | {r['refine']} | {r['mean_cos']:.4f} | "
             f"{r['p5_cos']:.4f} | {r['relmse']:.4f} | {r['train_seconds']:.0f} | {r['refine_seconds']:.0f} | "
             f"{r['encode_tok_s']:,} |" for r in rows]
    return "\n".join(head + table)


def _budget_m(method: str, budget: int, d: int, norm: int) -> int:
    """The largest M <= budget that the spec accepts for dim ``d`` (resolve_m holds the rule)."""
    for m in range(budget, 0, -1):
        try:
            return QuantizerSpec(method=method, m=m, norm=norm).resolve_m(d)
        except QuantizeError:
            continue
    return budget  # nothing fits: the row reports resolve_m's reason


def decode_throughput(m: int = 48, d: int = 384, tokens: int = 1 << 18, additive: bool = True, repeat: int = 5) -> str:
    """Tokens/s of the torch CodeDecoder on every available device (harness: medians and spreads)."""
    import torch

    from kdcache.store.codes import ADDITIVE, PRODUCT, Codebooks
    from kdcache.targets.decoding import CodeDecoder
    rng = np.random.default_rng(0)
    cb = Codebooks("rq" if additive else "pq", ADDITIVE if additive else PRODUCT, rng.standard_normal(d).astype(np.float32),
                   np.linalg.qr(rng.standard_normal((d, d)))[0].astype(np.float32),
                   rng.standard_normal((m, 256, d if additive else d // m)).astype(np.float32), {})
    out = []
    for dev in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        dec = CodeDecoder(cb).to(dev)
        codes = torch.randint(0, 256, (tokens, m), dtype=torch.uint8, device=dev)

        def run():
            dec(codes)
            if dev == "cuda":
                torch.cuda.synchronize()
            return tokens
        out.append(f"| {dev} | {cb.method} | {m} | {d} | {measure({dev: run}, repeat=repeat).rate(dev).fmt(0)} |")
    return "\n".join(["| device | kind | M | D | decoded tokens/s |", "|---|---|---|---|---|"] + out)


def run_bench_quantize(o: QuantizeBench, *, log=print) -> str:
    """``kdcache bench quantize``: the features asked for, then the table (with decode throughput)
    or, with ``curve``, the fidelity curve."""
    train, held, what = load_features(store=o.store, teacher=o.teacher, npy=o.npy, minilm=o.minilm, effnet=o.effnet,
                                      train_tokens=o.train_tokens, cross_source=o.curve or o.other_source)
    if o.curve:
        return fidelity_curve(train, held, what=what, fractions=o.fractions_used, beams=o.beams, refines=o.refines,
                              as_json=o.as_json, log=log)
    if isinstance(held, dict):
        name, held = next(iter(held.items()))
        what += f" (table: held out on {name})"
    table = bench_quantize(train, held, what=what, methods=o.methods, fractions=list(o.fractions_used), beam=o.beam,
                           refine=o.refine, repeat=o.repeat, as_json=o.as_json, log=log)
    if o.as_json:
        return table
    return table + "\n\n" + decode_throughput(d=train.shape[1], m=max(1, train.shape[1] // 8), repeat=o.repeat)
