"""Evaluation and benchmark commands: ``kdcache eval ...`` and ``kdcache bench ...``."""
from __future__ import annotations

import json

import click

from .common import apply_storage_options, cli, with_bench_options, with_storage_options


@cli.group("eval")
def eval_group():
    """Is the student good? Evaluations of features (kNN on cached teacher features).

    \b
    kdcache eval knn --store feats.zarr --data /data/shards
    """


def _eval_features(fn):
    """The features to evaluate (exactly one of --store, --run, --model) and the split: shared by
    every ``kdcache eval`` probe."""
    options = [
        click.option("--data", required=True, help="The labelled corpus (webdataset cls fields or image-folder classes)."),
        click.option("--store", help="A store's cached summary features: the teacher's ceiling, free (one of --store, "
                                     "--run, --model is required)."),
        click.option("--run", "run_dir", help="The student of a training run, live (one of --store, --run, --model "
                                              "is required)."),
        click.option("--ema", is_flag=True, help="With --run: the EMA weights. [default: off]"),
        click.option("--model", help="A timm model live, MODEL[,key=value] (pretrained=false: a random-init baseline; "
                                     "one of --store, --run, --model is required)."),
        click.option("--teacher", "-t", help="With --store: the teacher. [default: the first]"),
        click.option("--val-fraction", type=float, default=0.2, show_default=True, help="Seeded share of samples held out."),
        click.option("--val-data", help="A labelled validation corpus: the split is given (all of --data trains, all of "
                                        "this validates) instead of seeded. [default: none]"),
        click.option("--val-store", help="With --store and --val-data: the store extracted from --val-data. [default: none]"),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed of the train/val split."),
        click.option("--skip-corrupt", is_flag=True, help="With --store: leave out shards that fail verification "
                                                          "(reported). [default: off]"),
        click.option("--json", "as_json", is_flag=True, help="Result and protocol as JSON. [default: off]"),
        click.option("--out", "out_file", help="Also write the JSON (result and exact protocol) here. [default: none]"),
        with_storage_options,
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _evaluate(probe, data, store, run_dir, ema, model, teacher, val_fraction, val_data, val_store, seed, skip_corrupt, as_json,
              out_file, storage_options, **knn):
    from kdcache.eval.model_features import knn_on_model
    from kdcache.eval.store_features import format_knn, knn_on_store
    if sum(x is not None for x in (store, run_dir, model)) != 1:
        raise click.UsageError("give exactly one of --store, --run, --model")
    apply_storage_options(storage_options, *(u for u in (store, data, val_store, val_data) if u))
    opts = dict(val_fraction=val_fraction, seed=seed, probe=probe, **knn)
    if val_store and not store:
        raise click.UsageError("--val-store goes with --store (the cached features of --val-data)")
    if store:
        r = knn_on_store(store, data, teacher=teacher, skip_corrupt=skip_corrupt, val_store=val_store, val_data=val_data, **opts)
    else:
        r = knn_on_model("run" if run_dir else "model", data, run=run_dir, ema=ema, model=model, val_data=val_data, **opts)
    if out_file:
        with open(out_file, "w") as f:
            json.dump(r, f, indent=2)
    click.echo(json.dumps(r, indent=2) if as_json else format_knn(r))


@eval_group.command("knn")
@_eval_features
@click.option("--k", type=click.IntRange(min=1), default=20, show_default=True, help="Neighbours that vote.")
@click.option("--temperature", type=float, default=0.07, show_default=True, help="Votes weigh exp(similarity / T).")
def eval_knn(**kw):
    """kNN top-1/top-5 (DINO protocol: cosine, k=20, T=0.07) of one set of summary features
    (exactly one of --store, --run, --model), on a seeded split of a labelled corpus.

    \b
    kdcache eval knn --data /data/shards --store feats.zarr              # the teacher's cached features
    kdcache eval knn --data /data/shards --run runs/r18                  # the distilled student
    kdcache eval knn --data /data/shards --model resnet18,img_size=64    # a random-init student
    """
    _evaluate("knn", **kw)


@eval_group.command("store")
@click.argument("store")
@click.option("--tokens", type=click.IntRange(min=1), default=16384, show_default=True,
              help="Stored tokens to measure quantization fidelity on (when the floats were kept).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output. [default: off]")
@with_storage_options
def eval_store(store, tokens, as_json, storage_options):
    """Bytes per sample per teacher, the ratio to fp32, and what quantization kept (cosine, relMSE).

    \b
    kdcache eval store feats.zarr
    kdcache eval store s3://bucket/feats.zarr --json
    """
    from kdcache.eval.store_report import format_store_report, store_report
    apply_storage_options(storage_options, store)
    r = store_report(store, tokens=tokens)
    click.echo(json.dumps(r, indent=2) if as_json else format_store_report(r))


@eval_group.command("fidelity")
@click.option("--run", "run_dir", required=True, help="A training run directory.")
@click.option("--store", help="Store whose cached targets to compare with. [default: the run's]")
@click.option("--data", help="Its corpus. [default: the run's]")
@click.option("--shards", help="Glob of shards to evaluate on, e.g. held-out ones. [default: all of the corpus]")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output. [default: off]")
@with_storage_options
def eval_fidelity(run_dir, store, data, shards, as_json, storage_options):
    """Per teacher, mean cosine between the student's head outputs and the cached targets, summary
    and patch tokens separately (normalised space and teacher space).

    \b
    kdcache eval fidelity --run runs/r18
    kdcache eval fidelity --run runs/r18 --store heldout.zarr --data /data/heldout
    """
    from kdcache.eval.fidelity import fidelity, format_fidelity
    apply_storage_options(storage_options, *(u for u in (store, data) if u))
    r = fidelity(run_dir, store=store, data=data, shards=shards)
    click.echo(json.dumps(r, indent=2) if as_json else format_fidelity(r))


@eval_group.command("linear")
@_eval_features
def eval_linear(**kw):
    """Linear probe: logistic regression on frozen summary features, regularisation chosen on a
    split of the training samples, scored on the held-out ones (same split as kNN).

    \b
    kdcache eval linear --data /data/shards --store feats.zarr
    kdcache eval linear --data /data/shards --run runs/r18 --json --out r18-linear.json
    """
    _evaluate("linear", **kw)


@cli.command()
@click.argument("run")
@click.option("--data", help="Labelled corpus for kNN. [default: the run's --data]")
@click.option("--no-knn", is_flag=True, help="Leave out the kNN table (no model is run). [default: off]")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the kNN train/val split.")
@click.option("--out", help="Directory for report.md and its PNGs. [default: RUN/report]")
@click.option("--json", "as_json", is_flag=True, help="Print the report's numbers as JSON. [default: off]")
@with_storage_options
def report(run, data, no_knn, seed, out, as_json, storage_options):
    """One markdown report of RUN, with PNG plots: losses per teacher, kNN of the teacher vs the
    student vs a random-init student, bytes per sample per storage option.

    \b
    kdcache report runs/r18                       # writes runs/r18/report/report.md
    kdcache report runs/r18 --data /data/labelled --out /tmp/r18-report
    kdcache report runs/r18 --no-knn --json
    """
    from kdcache.eval.report import report as make_report
    apply_storage_options(storage_options, *(u for u in (data,) if u))
    r = make_report(run, data=data, knn=not no_knn, seed=seed, out=out)
    click.echo(json.dumps(r, indent=2) if as_json else r["report"])


@cli.group()
def bench():
    """Benchmarks: every side warmed up, repeated and interleaved; medians, spreads, ratios per round.

    \b
    kdcache bench extract
    kdcache bench train --quantize pq:M=24
    """


@bench.command("extract")
@click.option("--teacher", "-t", default="vit=vit_small_patch16_224,pretrained=false", show_default=True, help="Teacher spec.")
@click.option("--images", type=int, default=96, show_default=True, help="Images in the benchmark corpus.")
@click.option("--batch-size", type=int, default=16, show_default=True, help="Images per forward batch.")
@click.option("--workers", type=int, default=1, show_default=True, help="DataLoader decode workers.")
@click.option("--codec", default="lz4", show_default=True, help="Store codec: none, lz4, zstd.")
@click.option("--quantize", help="METHOD[:M=..,beam=..] as for extract: also time the torch encoder on the teacher's own "
              "patch features (quantizer fit on them) and print encode tok/s / teacher tok/s. [default: none]")
@with_bench_options
def bench_extract(teacher, images, batch_size, workers, codec, quantize, repeat, as_json):
    """Bare teacher forward img/s vs end-to-end extraction img/s on the same images.

    \b
    kdcache bench extract
    kdcache bench extract -t cnn=resnet50,pretrained=false --images 64
    kdcache bench extract -t effnet=tf_efficientnet_lite0,checkpoint=lite0.safetensors --quantize rq:M=160,norm=1,beam=8,niter=4
    """
    from kdcache.eval.bench_extract import bench_extract as run
    click.echo(run(teacher=teacher, images=images, batch_size=batch_size, workers=workers, codec=codec, quantize=quantize,
                   repeat=repeat, as_json=as_json))


@bench.command("load")
@click.option("--store", help="A store to read (with --data). [default: build one from the demo corpus]")
@click.option("--data", help="The corpus --store was extracted from (required with --store).")
@click.option("--teacher", "-t", default="vit=vit_small_patch16_224,pretrained=false", show_default=True,
              help="Teacher of the store the bench builds.")
@click.option("--images", type=int, default=128, show_default=True, help="Images in the store the bench builds.")
@click.option("--workers", type=int, default=1, show_default=True, help="Loader workers.")
@click.option("--batch-size", type=int, default=16, show_default=True, help="Samples per batch.")
@click.option("--s3", default="auto", show_default=True, help="auto: also a loopback moto S3 server; off; or an s3:// URL "
              "to copy the store to.")
@with_bench_options
@with_storage_options
def bench_load(store, data, teacher, images, workers, batch_size, s3, repeat, as_json, storage_options):
    """Loader samples/s and MB/s with verification on and off, local and on S3.

    \b
    kdcache bench load
    kdcache bench load --store feats.zarr --data /data/shards --s3 off
    """
    from kdcache.eval.bench_load import bench_load as run
    apply_storage_options(storage_options, *(u for u in (store, data, s3) if u))
    click.echo(run(store=store, data=data, teacher=teacher, images=images, workers=workers, batch_size=batch_size, s3=s3,
                   repeat=repeat, as_json=as_json))


@bench.command("quantize")
@click.option("--store", help="Store with float patch features of --teacher (one of --store, --npy, --minilm is required).")
@click.option("--teacher", "-t", help="Teacher in --store. [default: the first]")
@click.option("--npy", help="An (N, D) feature matrix instead of a store (one of --store, --npy, --minilm is required).")
@click.option("--minilm", type=int, help="Use MiniLM token features of this many real texts (pip install 'kdcache[bench]'; "
              "one of --store, --npy, --minilm is required).")
@click.option("--effnet", is_flag=True, help="Use EfficientNet-Lite0 patch features (1280-d, the pretrained teacher that "
              "ships in a dependency) of crops of scikit-image's images (one of --store, --npy, --minilm, --effnet is required).")
@click.option("--curve", is_flag=True, help="The fidelity curve instead: rq (gain-shape) at --fractions, for every "
              "--beams x --refines, held out on another source (--minilm or --effnet). [default: off]")
@click.option("--other-source", is_flag=True, help="--minilm/--effnet: hold out texts/images of another source (always "
              "with --curve; the table uses the first held-out set). [default: off, a random token split]")
@click.option("--beams", default="8,16,32", show_default=True, help="--curve: rq encode beam widths.")
@click.option("--refines", default="0,2,4", show_default=True, help="--curve: refinement rounds.")
@click.option("--methods", default="pq,pca,opq,opq+norm,rq,rq+norm,sq8,sq4", show_default=True,
              help="METHOD or METHOD+norm (gain-shape), comma-separated.")
@click.option("--fractions", help="M = fp16 bytes / fraction. [default: 64,32,16; --curve: 16,32]")
@click.option("--beam", type=int, default=4, show_default=True, help="rq encode beam width.")
@click.option("--refine", type=int, default=0, show_default=True, help="rq: rounds of joint least-squares codebook refinement.")
@click.option("--train-tokens", type=int, default=65536, show_default=True, help="Training tokens per quantizer.")
@with_bench_options
def bench_quantize(store, teacher, npy, minilm, effnet, curve, other_source, beams, refines, methods, fractions, beam, refine, train_tokens,
                   repeat, as_json):
    """Bytes per token vs relMSE and cosine for every method and M, encode speed of faiss and of
    the torch encoder (every device present), decode throughput; or (--curve) rq fidelity over
    beam width x refinement, held out on texts or images of another source.

    \b
    kdcache bench quantize --store feats.zarr -t dino
    kdcache bench quantize --minilm 1600 --methods opq,rq,rq+norm --fractions 32,16
    kdcache bench quantize --minilm 1600 --methods rq+norm --fractions 16 --beam 8 --refine 2
    kdcache bench quantize --npy tokens.npy --methods pq,opq
    kdcache bench quantize --minilm 1600 --curve --train-tokens 32768
    kdcache bench quantize --effnet --curve --train-tokens 8192 --beams 8,16 --refines 0,2
    kdcache bench quantize --effnet --other-source --methods pq,pq+norm,pca --fractions 32,16 --train-tokens 8192
    """
    from kdcache.eval.bench_quantize import bench_quantize as run, decode_throughput, fidelity_curve, load_features
    if sum(bool(x) for x in (store, npy, minilm, effnet)) != 1:
        raise click.UsageError("give exactly one of --store, --npy, --minilm, --effnet")
    if curve and not (minilm or effnet):
        raise click.UsageError("--curve holds out another source: give --minilm or --effnet")
    fracs = _ints("--fractions", fractions or ("16,32" if curve else "64,32,16"))
    train, held, what = load_features(store=store, teacher=teacher, npy=npy, minilm=minilm, effnet=effnet,
                                      train_tokens=train_tokens, cross_source=curve or other_source)
    if curve:
        click.echo(fidelity_curve(train, held, what=what, fractions=fracs, beams=_ints("--beams", beams),
                                  refines=_ints("--refines", refines, low=0), as_json=as_json,
                                  log=lambda r: click.echo(r, err=True)))
        return
    if isinstance(held, dict):
        name, held = next(iter(held.items()))
        what += f" (table: held out on {name})"
    table = run(train, held, what=what, methods=methods.split(","), fractions=list(fracs),
                beam=beam, refine=refine, repeat=repeat, as_json=as_json, log=lambda r: click.echo(r, err=True))
    click.echo(table if as_json else table + "\n\n" + decode_throughput(d=train.shape[1], m=max(1, train.shape[1] // 8),
                                                                       repeat=repeat))


@bench.command("codec")
@click.option("--npy", help="An (N, D) feature matrix (one of --npy, --minilm is required).")
@click.option("--minilm", type=int, help="MiniLM token features of this many real texts (pip install 'kdcache[bench]'; "
              "one of --npy, --minilm is required).")
@with_bench_options
def bench_codec(npy, minilm, repeat, as_json):
    """Stored size and write/read speed of none, lz4 and zstd on the same fp16 features.

    \b
    kdcache bench codec --minilm 800
    kdcache bench codec --npy tokens.npy
    """
    from kdcache.eval.bench_codec import bench_codec_source
    if (npy is None) == (minilm is None):
        raise click.UsageError("give exactly one of --npy, --minilm")
    click.echo(bench_codec_source(npy=npy, minilm=minilm, repeat=repeat, as_json=as_json))


@bench.command("train")
@click.option("--teacher", "-t", default="vit=vit_small_patch16_224,pretrained=false", show_default=True, help="Teacher spec.")
@click.option("--student", "-s", default="resnet18,img_size=224", show_default=True, help="Student spec.")
@click.option("--images", type=int, default=96, show_default=True, help="Images in the benchmark corpus.")
@click.option("--batch-size", type=int, default=16, show_default=True, help="Samples per step.")
@click.option("--steps", type=int, default=6, show_default=True, help="Timed steps per measurement.")
@click.option("--workers", type=int, default=1, show_default=True, help="Loader workers.")
@click.option("--quantize", help="Store the teacher's patches as codes (e.g. pq:M=24) for the cached run. [default: fp16]")
@with_bench_options
def bench_train(teacher, student, images, batch_size, steps, workers, quantize, repeat, as_json):
    """Online distillation vs cached targets vs student alone: step times and ratios.

    \b
    kdcache bench train
    kdcache bench train --quantize pq:M=24 --student vit_tiny_patch16_224
    """
    from kdcache.eval.bench_train import bench_train as run
    click.echo(run(teacher=teacher, student=student, images=images, batch_size=batch_size, steps=steps, workers=workers,
                   quantize=quantize, repeat=repeat, as_json=as_json))


def _ints(option: str, text: str, *, low: int = 1) -> tuple[int, ...]:
    try:
        out = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected comma-separated integers", param_hint=option) from None
    if not out or min(out) < low:
        raise click.BadParameter(f"{text!r}: expected comma-separated integers >= {low}", param_hint=option)
    return out


@bench.command("quality")
@click.option("--out", required=True, help="Directory for the stores, runs, quality.json and quality.md (reused on rerun).")
@click.option("--data", help="Labelled corpus. [default: the embedded corpus with --digits + --photos images]")
@click.option("--teacher", help="NAME=MODEL[,key=value] teacher. [default: the shipped EfficientNet-Lite0]")
@click.option("--student", default="resnet18,img_size=64", show_default=True, help="MODEL[,key=value] student.")
@click.option("--epochs", type=click.IntRange(min=1), default=8, show_default=True, help="Epochs of every variant.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True, help="Samples per step.")
@click.option("--views", default="1,2,8", show_default=True, help="K of the fp16 stores, comma-separated.")
@click.option("--quantized-views", type=click.IntRange(min=1), default=2, show_default=True,
              help="K of the store the quantized variants derive from (one of --views).")
@click.option("--fractions", default="16,32", show_default=True, help="Quantized patch bytes as 1/F of fp16, comma-separated.")
@click.option("--methods", default="opq,rq+norm", show_default=True, help="pq, opq, rq, rq+norm; comma-separated.")
@click.option("--no-predict-codes", is_flag=True, help="Leave out the --predict-codes variant. [default: off]")
@click.option("--digits", type=click.IntRange(min=1), default=1000, show_default=True, help="Embedded corpus: digit images.")
@click.option("--photos", type=click.IntRange(min=0), default=200, show_default=True, help="Embedded corpus: photo crops.")
@click.option("--train-tokens", type=click.IntRange(min=256), default=8192, show_default=True,
              help="Quantizer training tokens.")
@click.option("--workers", type=click.IntRange(min=0), default=1, show_default=True, help="Loader workers.")
@click.option("--json", "as_json", is_flag=True, help="The result as JSON. [default: off]")
def bench_quality(out, data, teacher, student, epochs, batch_size, views, quantized_views, fractions, methods,
                  no_predict_codes, digits, photos, train_tokens, workers, as_json):
    """kNN of students trained online, from fp16 stores with K views, from quantized stores, and
    with --predict-codes: the same teacher, student and optimizer steps; ratios to online.

    \b
    kdcache bench quality --out /tmp/quality
    kdcache bench quality --out /tmp/q --views 1,8 --quantized-views 8 --methods opq --fractions 16
    kdcache bench quality --out /tmp/q --data /data/labelled --teacher dino=vit_small_patch14_dinov2.lvd142m
    """
    from kdcache.eval.bench_quality import QualityPlan, format_quality, quality_study
    plan = QualityPlan(corpus=data, teacher=teacher, student=student, epochs=epochs, batch_size=batch_size,
                       views=_ints("--views", views), quantized_views=quantized_views,
                       fractions=_ints("--fractions", fractions), methods=tuple(m for m in methods.split(",") if m),
                       predict_codes=not no_predict_codes, digits=digits, photos=photos, train_tokens=train_tokens,
                       workers=workers)
    r = quality_study(out, plan)
    click.echo(json.dumps(r, indent=2) if as_json else format_quality(r))


@bench.command("formats")
@click.option("--store", help="An fp16 store whose features to write in every format. [default: the embedded corpus "
                              "extracted with the shipped EfficientNet-Lite0, K=--views]")
@click.option("--teacher", "-t", help="Teacher of --store. [default: the first]")
@click.option("--images", type=click.IntRange(min=1), default=256, show_default=True, help="Without --store: corpus images.")
@click.option("--views", type=click.IntRange(min=1), default=2, show_default=True, help="Without --store: K stored views.")
@click.option("--quantize", "method", default="opq", show_default=True,
              help="Method of the quantized store side (pq, opq, rq); 'none' leaves it out.")
@click.option("--fraction", type=click.IntRange(min=1), default=32, show_default=True,
              help="Quantized patch bytes = fp16 bytes / FRACTION.")
@click.option("--workers", type=click.IntRange(min=0), default=1, show_default=True, help="DataLoader workers, every side.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True, help="Samples per batch.")
@click.option("--warm", is_flag=True, help="Read from a warm page cache instead of dropping it. [default: off]")
@click.option("--tmp", help="Directory (disk) to write the formats in. [default: the system temp dir]")
@with_bench_options
def bench_formats(store, teacher, images, views, method, fraction, workers, batch_size, warm, tmp, repeat, as_json):
    """The same features as a kdcache store (fp16, quantized), safetensors in webdataset tars,
    a torch file per sample and a .npy per sample: bytes/sample, write MB/s, read samples/s.

    \b
    kdcache bench formats
    kdcache bench formats --store feats.zarr --workers 4 --batch-size 64
    kdcache bench formats --store feats.zarr --quantize rq --fraction 16 --json
    """
    import tempfile
    from kdcache.eval.bench_formats import bench_formats as run
    with tempfile.TemporaryDirectory(dir=tmp) as scratch:
        if store is None:
            from kdcache.data.demo_corpus import build_demo_corpus
            from kdcache.extract import ExtractOptions, extract
            from kdcache.models.convert import shipped_teacher
            corpus, store = f"{scratch}/corpus", f"{scratch}/store.zarr"
            build_demo_corpus(corpus, digits=max(0, images - images // 4), photos=images // 4)
            extract(corpus, store, [shipped_teacher(scratch)], ExtractOptions(views=views, progress=False))
        click.echo(run(store, quantize=None if method == "none" else method, fraction=fraction, teacher=teacher,
                       workers=workers, batch_size=batch_size, repeat=repeat, cold=not warm, tmp=tmp, as_json=as_json))


@bench.command("teachers")
@click.option("--out", required=True, help="Directory for the corpus, teachers, store, runs, teachers.json/.md (reused).")
@click.option("--student", default="resnet18,img_size=64", show_default=True, help="MODEL[,key=value] student.")
@click.option("--epochs", type=click.IntRange(min=1), default=8, show_default=True, help="Epochs of every variant.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True, help="Samples per step.")
@click.option("--views", type=click.IntRange(min=1), default=2, show_default=True, help="K views in the store.")
@click.option("--digits", type=click.IntRange(min=1), default=600, show_default=True, help="Embedded corpus: digit images.")
@click.option("--photos", type=click.IntRange(min=0), default=120, show_default=True, help="Embedded corpus: photo crops.")
@click.option("--vit-epochs", type=click.IntRange(min=1), default=30, show_default=True,
              help="Epochs of supervised training of the second (ViT) teacher.")
@click.option("--variant", "variants", multiple=True, help="Only these variants (repeat). [default: all]")
@click.option("--json", "as_json", is_flag=True, help="The result as JSON. [default: off]")
def bench_teachers(out, student, epochs, batch_size, views, digits, photos, vit_epochs, variants, as_json):
    """Two heterogeneous teachers (the shipped EfficientNet-Lite0, a ViT trained here on the corpus
    labels), one student per multi-teacher option: kNN and per-teacher fidelity side by side.

    \b
    kdcache bench teachers --out /tmp/teachers
    kdcache bench teachers --out /tmp/t --variant "static weights" --variant "--balance mgda"
    """
    from kdcache.eval.bench_multiteacher import VARIANTS, TeachersPlan, format_teachers, teachers_study
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise click.BadParameter(f"{unknown[0]!r}: expected one of {', '.join(map(repr, VARIANTS))}", param_hint="--variant")
    plan = TeachersPlan(student=student, epochs=epochs, batch_size=batch_size, views=views, digits=digits, photos=photos,
                        vit_epochs=vit_epochs)
    r = teachers_study(out, plan, variants=list(variants) or None)
    click.echo(json.dumps(r, indent=2) if as_json else format_teachers(r))
