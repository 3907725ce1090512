"""``kdcache bench quantize``: bytes per token vs fidelity, for every method and M, one run.

Features come from a store (a teacher's float patches, sampled as ``kdcache quantize`` would),
a ``.npy`` (N, D) matrix, or MiniLM token features (real pretrained, high rank; needs the
``bench`` extra). Held-out tokens are never trained on.
"""
from __future__ import annotations

import json
import time

import numpy as np

from kdcache.quantize import QuantizeError, QuantizerSpec, SampleSpec, encode, fit
from kdcache.quantize.fidelity import fidelity

from .harness import environment, header, measure

DEFAULT_METHODS = ("pq", "pca", "opq", "opq+norm", "rq", "rq+norm", "sq8", "sq4")


def load_features(*, store: str | None = None, teacher: str | None = None, npy: str | None = None,
                  minilm: int | None = None, train_tokens: int = 65536, seed: int = 0):
    """(train, held_out, description)."""
    if store:
        from kdcache.quantize.sample import draw, training_prefix
        from kdcache.store import Store
        s = Store.open(store)
        teacher = teacher or next(iter(s.meta.teachers))
        spec = SampleSpec(train_tokens=train_tokens, seed=seed)
        shards, _ = training_prefix(s, teacher, "patch", spec)
        train, held, _ = draw(s, teacher, "patch", shards, spec)
        return train, held, f"store {store}, teacher {teacher} ({s.meta.teachers[teacher].model}) patch tokens"
    if npy:
        x, what = np.load(npy).astype(np.float32), f"{npy}"
    else:
        from .text_features import minilm_token_features
        x, what = minilm_token_features(minilm or 1600), f"MiniLM-L6 (all-MiniLM-L6-v2) token features, {minilm or 1600} real texts"
    idx = np.random.default_rng(seed).permutation(len(x))
    held = min(8192, len(x) // 8)
    return x[idx[held:held + train_tokens]], x[idx[:held]], what


def bench_quantize(train: np.ndarray, held: np.ndarray, *, what: str, methods=DEFAULT_METHODS, fractions=(64, 32, 16),
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
            fitted.append((key, name, m_eff, cb, time.perf_counter() - t0, fidelity(held, cb.decode(encode(cb, held)))))
            rows.append((name, key, None))
            log(f"trained {key} in {fitted[-1][4]:.1f} s")
    m = measure({key: (lambda cb=cb: encode(cb, held)) for key, _, _, cb, _, _ in fitted}, repeat=repeat,
                items={key: len(held) for key, *_ in fitted}) if fitted else None
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
            table.append(f"| {name} | {key or '-'} | - | - | - | - | - | - | - | {error} |")
            continue
        _, _, m_eff, cb, secs, f = by_key[key]
        table.append(f"| {name} | {m_eff} | {m_eff} | 1/{2 * d / m_eff:.0f} | {secs:.1f} | {m.rate(key).fmt(0)} | "
                     f"{f['relmse']:.4f} | {f['mean_cos']:.4f} | {f['p5_cos']:.4f} | |")
    head = [header(f"bench quantize: {what}", env, repeat=repeat, warmup=1 if m else 0),
            f"D={d}, fp16 = {2 * d} bytes/token; {len(train)} training tokens, {len(held)} held-out tokens; rq beam {beam}, "
            f"refine {refine}; encode tok/s is median (min-max), fidelity is deterministic", "",
            "| method | M | bytes/token | of fp16 | train s | encode tok/s | relMSE (centred) | mean cos | p5 cos | note |",
            "|---|---|---|---|---|---|---|---|---|---|"]
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

    from kdcache.quantize.decoder import CodeDecoder
    from kdcache.store.codes import ADDITIVE, PRODUCT, Codebooks
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
