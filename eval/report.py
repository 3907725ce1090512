"""``kdcache report RUN``: one markdown file, with PNG plots, that says how a run went.

``RUN/report/report.md`` holds: the run's settings, its last losses per teacher (plot: every
teacher's summary and patch loss against the step), kNN top-1/top-5 of the random-init student,
the distilled student and each teacher on the same seeded split of a labelled corpus (plot),
and the bytes per sample each storage option costs for this run's teachers (plot: fp32, fp16,
and what the store holds; an online run stores nothing). Plain markdown and PNGs: readable
without kdcache. kNN results are kept in ``RUN/report/knn.json`` and reused only while
everything they were computed from is unchanged (``_knn_key``): the run's checkpoint, the
corpus, the split, and the store's digests (or an online run's teachers).
"""
from __future__ import annotations

import json
import os

from kdcache.errors import KdcacheError, check_output
from kdcache.train.metrics import logged_weights, plot_losses, read_metrics
from kdcache.train.rundir import RunDir, kept_json


def _knn_rows(run: str, cfg, prov: dict, data: str, *, seed: int, cache: str) -> list[dict]:
    """kNN of the random-init student, the distilled student, and each teacher. The teachers'
    cached features are read (verified) every time: a damaged store stops the report before any
    model runs. The models' rows, which cost a forward pass over the corpus, are kept in
    ``cache`` and reused while everything they depend on is unchanged (``_knn_key``)."""
    from .model_features import labelled_model_features
    from .options import ProbeOptions
    from .probes import probe
    from .store_features import probe_store
    options = ProbeOptions(seed=seed)

    images = None if data else (cfg.store or None)  # no corpus: the run's store's view pixels

    def live(net, data_cfg, what):
        f = labelled_model_features(net, data_cfg, data, progress=True, images=images)
        return probe(f["x"], f["y"], what, resolution=list(data_cfg.hw), options=options)

    def row(label, result):  # the short label for the table; the full description kept
        return {**result, "features": label, "described": result["features"]}

    teachers = []
    if not prov.get("online"):
        for t in cfg.teachers or prov["store_meta"]["teachers"]:
            teachers.append(row(f"teacher {t} (cached)", probe_store(cfg.store, data, options, teacher=t, progress=True)))
    key = _knn_key(RunDir(run), cfg, prov, data, seed)
    rows = kept_json(cache, lambda: _model_rows(run, cfg, prov, data, options, images, live, row), key=key)
    return rows + teachers


def _model_rows(run, cfg, prov, data, options, images, live, row) -> list[dict]:
    """The rows that cost a forward pass over the corpus: the random-init and distilled students
    (and the EMA's), an online run's live teachers."""
    from kdcache.models.teacher import create_teacher

    from .model_features import probe_model, random_init_student, run_student
    rows = [row("random-init student", live(*random_init_student(run))),
            row("distilled student", probe_model("run", data, options, run=run, progress=True, images=images))]
    if os.path.exists(os.path.join(run, "checkpoints", "last", "ema.safetensors")):
        rows.append(row("distilled student (EMA)", live(*run_student(run, ema=True))))
    if prov.get("online"):
        for spec in cfg.teachers:
            t = create_teacher(spec)
            rows.append(row(f"teacher {t.name} (live)", live(t.model, t.data, f"teacher {t.name}, live")))
    return rows


def _knn_key(rundir: RunDir, cfg, prov: dict, data: str, seed: int) -> str:
    """sha256 of everything the kNN rows depend on: the checkpoint's weights files (names, sizes,
    times), the corpus's shard files, the seed, and the store's shard digests (a damaged or
    replaced store changes them) or, for an online run, its teachers' weights."""
    import hashlib

    from kdcache.data.corpus import resolve_corpus
    parts = {"data": data, "seed": seed, "checkpoint": _files_stamp(rundir.checkpoint)}
    if data:  # (no corpus: the images are the store's pixels, covered by its digests below)
        corpus = resolve_corpus(data)
        parts["corpus"] = [corpus.fingerprint(), *(_files_stamp(u) for u in sorted({s.url for s in corpus.shards})
                                                   if os.path.exists(u))]
    if prov.get("online"):
        parts["teachers"] = {t: m.get("weights_sha256") for t, m in prov.get("teachers", {}).items()}
    else:
        from kdcache.store import Store
        store = Store.open(cfg.store)
        parts["store"] = {name: (store.shard_attrs(name) or {}).get("digest") for name in store.shard_names()}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _files_stamp(path: str) -> list:
    """(name, size, mtime) of a file, or of every file under a directory."""
    if os.path.isfile(path):
        st = os.stat(path)
        return [[path, st.st_size, st.st_mtime_ns]]
    return sorted([os.path.relpath(os.path.join(r, f), path), os.stat(os.path.join(r, f)).st_size,
                   os.stat(os.path.join(r, f)).st_mtime_ns] for r, _, fs in os.walk(path) for f in fs)


def _bytes_rows(cfg, prov: dict) -> list[dict]:
    """Per teacher: bytes per sample in fp32, fp16, and as this run's store holds them."""
    if prov.get("online"):
        metas, views, stored = prov["teachers"], 1, {}
    else:
        from kdcache.store import Store
        from kdcache.store.inspect import info
        r = info(Store.open(cfg.store))
        metas, views = prov["store_meta"]["teachers"], r["views"]
        stored = {t: row["bytes_per_sample"] for t, row in r["teachers"].items()}
    rows = []
    for t, m in metas.items():
        floats = views * (m["tokens"] + 1) * m["dim"]
        rows.append({"teacher": t, "views": views, "fp32": floats * 4, "fp16": floats * 2, "stored": stored.get(t)})
    return rows


def _bar(path: str, labels: list[str], series: dict[str, list[float]], *, ylabel: str, title: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(max(4.5, 1.4 * len(labels) * len(series)), 3.6))
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        xs = [j + i * width for j in range(len(labels))]
        ax.bar(xs, values, width, label=name)
    ax.set_xticks([j + width * (len(series) - 1) / 2 for j in range(len(labels))], labels, rotation=15, ha="right")
    ax.set(ylabel=ylabel, title=title)
    if len(series) > 1:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def report(run: str, *, data: str | None = None, knn: bool = True, seed: int = 0, out: str | None = None) -> dict:
    rundir = RunDir(run)
    cfg, prov = rundir.read_config(), rundir.read_provenance()
    if not os.path.exists(rundir.metrics):
        raise KdcacheError(f"{rundir.metrics}: the run has no metrics yet (train it first)")
    metrics = read_metrics(rundir)
    if not metrics:
        raise KdcacheError(f"{rundir.metrics}: no rows (train it first)")
    out = check_output(out or rundir.file("report"), kind="dir")
    os.makedirs(out, exist_ok=True)
    teachers = [c[: -len("/summary")] for c in metrics[0] if c.endswith("/summary")]
    files = {"losses": plot_losses(rundir, teachers, os.path.join(out, "losses.png"))}

    knn_rows = None
    if knn:
        data = data or cfg.data.corpus or None
        knn_rows = _knn_rows(run, cfg, prov, data, seed=seed, cache=os.path.join(out, "knn.json"))
        files["knn"] = _bar(os.path.join(out, "knn.png"), [r["features"] for r in knn_rows],
                            {"top-1": [r["top1"] for r in knn_rows], "top-5": [r["top5"] for r in knn_rows]},
                            ylabel="kNN accuracy", title="kNN: teacher vs student vs random init")
    bytes_rows = _bytes_rows(cfg, prov)
    series = {"fp32": [r["fp32"] / 1024 for r in bytes_rows], "fp16": [r["fp16"] / 1024 for r in bytes_rows]}
    if not prov.get("online"):
        series["this store"] = [(r["stored"] or 0) / 1024 for r in bytes_rows]
    files["bytes"] = _bar(os.path.join(out, "bytes.png"), [r["teacher"] for r in bytes_rows], series,
                          ylabel="KiB per sample", title="target bytes per sample, per storage option")
    text = _markdown(run, cfg, prov, metrics, teachers, knn_rows, bytes_rows, files, out)
    path = os.path.join(out, "report.md")
    with open(path, "w") as f:
        f.write(text)
    return {"report": path, "files": files, "knn": knn_rows, "bytes": bytes_rows, "epochs": rundir.read_epochs()}


def _markdown(run, cfg, prov, metrics, teachers, knn_rows, bytes_rows, files, out) -> str:
    last = metrics[-1]
    source = (f"online: teachers {', '.join(cfg.teachers)} run live" if prov.get("online")
              else f"store `{cfg.store}`")
    images = cfg.data.corpus or "the store's view pixels"
    lines = [f"# kdcache run `{run}`", "",
             f"Student `{cfg.student}` on `{images}`; targets from the {source}. "
             f"{last['step']} steps, {cfg.optimisation.epochs} epochs of batch {cfg.data.batch_size}, "
             f"{cfg.optimisation.opt} at lr {cfg.optimisation.lr} ({cfg.optimisation.sched}), "
             f"normalisation {cfg.objectives.normalize}, seed {cfg.seed}.", "",
             "## Losses", "", "| teacher | summary loss (last) | patch loss (last) |", "|---|---|---|"]
    lines += [f"| {t} | {float(last[f'{t}/summary']):.4f} | {float(last[f'{t}/patch']):.4f} |" for t in teachers]
    weights = logged_weights(metrics)
    if weights:  # --balance mgda / dto, --teacher-drop
        lines += ["", "| objective | mean weight | first | last |", "|---|---|---|---|"]
        for objective, values in weights.items():
            lines.append(f"| {objective} | {sum(values) / len(values):.3f} | {values[0]:.3f} | {values[-1]:.3f} |")
    lines += ["", f"Total loss {float(metrics[0]['loss']):.4f} at step {metrics[0]['step']} -> {float(last['loss']):.4f} "
                  f"at step {last['step']}.", "", f"![losses]({os.path.relpath(files['losses'], out)})", ""]
    epochs = RunDir(run).read_epochs()
    if epochs:  # RUN/epochs.jsonl: what every epoch delivered
        lines += ["## Epochs", "", "Samples each finished epoch delivered (summed over ranks), as the split planned them "
                  "(`--last-batch`: dropped or padded) and what corrupt data cost (skipped).", "",
                  "| epoch | ranks x workers | steps | samples | delivered | dropped | padded | skipped | resumed with |",
                  "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {e['epoch']} | {e['world']} x {e['workers']} | {e['steps']} | {e['samples']} | {e['delivered']} | "
                  f"{e['dropped']} | {e['padded']} | {e['skipped']} | "
                  f"{'-' if e['resumed_with'] is None else e['resumed_with']} |" for e in epochs]
        lines.append("")
    if knn_rows:
        p = knn_rows[0]["protocol"]
        lines += ["## kNN", "",
                  f"k={p['k']}, T={p['temperature']}, cosine; {knn_rows[0]['n_train']} train / {knn_rows[0]['n_val']} val "
                  f"samples, {knn_rows[0]['classes']} classes, split seed {p['seed']}, eval view.", "",
                  "| features | kNN top-1 | kNN top-5 |", "|---|---|---|"]
        lines += [f"| {r['features']} | {r['top1']:.4f} | {r['top5']:.4f} |" for r in knn_rows]
        lines += ["", f"![kNN]({os.path.relpath(files['knn'], out)})", ""]
    lines += ["## Bytes per sample", "", "| teacher | views | fp32 KiB | fp16 KiB | stored KiB |", "|---|---|---|---|---|"]
    kib = lambda v: "-" if v is None else f"{v / 1024:.1f}"  # noqa: E731
    lines += [f"| {r['teacher']} | {r['views']} | {kib(r['fp32'])} | {kib(r['fp16'])} | {kib(r['stored'])} |" for r in bytes_rows]
    lines += ["", "(fp32 and fp16: the teacher's summary and patch tokens for every stored view, uncompressed; "
                  "an online run stores none.)", "", f"![bytes]({os.path.relpath(files['bytes'], out)})", ""]
    return "\n".join(lines)
