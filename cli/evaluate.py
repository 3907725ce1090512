"""Evaluation commands: ``kdcache eval ...`` (is the student, is the store any good?) and ``kdcache report``."""
from __future__ import annotations

import json

import click

from kdcache.eval.options import STORE_REPORT_TOKENS, ProbeOptions

from .common import apply_storage_options, cli, defaults_of, drop_unset, with_storage_options

P = defaults_of(ProbeOptions)


@cli.group("eval")
def eval_group():
    """Is the student, is the store any good? Probes of features, fidelity of heads, store costs.

    \b
    kdcache eval knn --store feats.zarr --data /data/shards
    kdcache eval linear --run runs/r18 --data /data/shards
    kdcache eval fidelity --run runs/r18
    kdcache eval accuracy --run runs/kd --data /data/heldout
    kdcache eval store feats.zarr
    """


def _eval_features(fn):
    """The features to evaluate (exactly one of --store, --run, --model) and the split: shared by
    every ``kdcache eval`` probe."""
    options = [
        click.option("--data", help="The labelled corpus (webdataset cls fields or image-folder classes); optional with a "
                                    "store that recorded its labels (--store) or keeps its views' pixels (--run: the run's "
                                    "store; --images). [default: the store's labels, or its pixels]"),
        click.option("--images", help="With --run or --model and no --data: a store whose view-0 pixels are the images "
                                      "(the teacher's eval crop, resized). [default: --run's store]"),
        click.option("--store", help="A store's cached summary features: the teacher's ceiling, free (one of --store, "
                                     "--run, --model is required)."),
        click.option("--run", "run_dir", help="The student of a training run, live (one of --store, --run, --model "
                                              "is required)."),
        click.option("--ema", is_flag=True, help="With --run: the EMA weights. [default: off]"),
        click.option("--model", help="A timm model live, MODEL[,key=value] (pretrained=false: a random-init baseline; "
                                     "one of --store, --run, --model is required)."),
        click.option("--teacher", "-t", help="With --store: the teacher. [default: the first]"),
        click.option("--val-fraction", type=float, help="Seeded share of samples held out." + P("val_fraction")),
        click.option("--val-data", help="A labelled validation corpus: the split is given (all of --data trains, all of "
                                        "this validates) instead of seeded. [default: none]"),
        click.option("--val-store", help="With --store and --val-data: the store extracted from --val-data. [default: none]"),
        click.option("--seed", type=int, help="Seed of the train/val split." + P("seed")),
        click.option("--skip-corrupt", is_flag=True, help="With --store: leave out shards that fail verification "
                                                          "(reported). [default: off]"),
        click.option("--json", "as_json", is_flag=True, help="Result and protocol as JSON. [default: off]"),
        click.option("--out", "out_file", help="Also write the JSON (result and exact protocol) here. [default: none]"),
        with_storage_options,
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _evaluate(probe, data, images, store, run_dir, ema, model, teacher, val_fraction, val_data, val_store, seed, skip_corrupt,
              as_json, out_file, storage_options, **knn):
    from kdcache.errors import check_output
    from kdcache.eval.probes import evaluate, format_probe
    if out_file:
        check_output(out_file, kind="file")  # before the probe runs
    apply_storage_options(storage_options, store, data, val_store, val_data, images)
    options = ProbeOptions(probe=probe, **drop_unset(val_fraction=val_fraction, seed=seed, **knn))
    r = evaluate(options, data, store=store, run=run_dir, ema=ema, model=model, teacher=teacher, val_data=val_data,
                 val_store=val_store, skip_corrupt=skip_corrupt, progress=True, images=images)
    if out_file:
        with open(out_file, "w") as f:
            json.dump(r, f, indent=2)
    click.echo(json.dumps(r, indent=2) if as_json else format_probe(r))


@eval_group.command("knn")
@_eval_features
@click.option("--k", type=click.IntRange(min=1), help="Neighbours that vote." + P("k"))
@click.option("--temperature", type=float, help="Votes weigh exp(similarity / T)." + P("temperature"))
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
@click.option("--tokens", type=click.IntRange(min=1), default=STORE_REPORT_TOKENS, show_default=True,
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
@click.option("--run", "run_dir", help="A training run directory (how close its heads come to the targets). "
              "[default: none: --derived needs none]")
@click.option("--store", help="Store whose cached targets to compare with. [default: the run's]")
@click.option("--data", help="Its corpus. [default: the run's]")
@click.option("--shards", help="Glob of shards to evaluate on, e.g. held-out ones. [default: all of the corpus]")
@click.option("--derived", multiple=True, type=click.Choice(["stored", "sub-views", "cutmix", "mixup", "dense"]),
              help="Instead of a run: how close targets derived for new views (train --sub-views, --cutmix, --mixup, "
                   "--dense-views) come to the teacher run on the same pixels, on --store/--data (repeat). [default: none]")
@click.option("--teacher", "-t", help="With --derived, or --store alone: the store's teacher. [default: --derived the "
              "first, --store every one]")
@click.option("--samples", type=click.IntRange(min=1), help="With --derived: samples per option [default: 256]; with "
              "--store alone: images whose every stored view is recomputed [default: 32].")
@click.option("--teacher-weights", help="With --store alone: the teacher's checkpoint here (when the path the store records "
              "is another machine's); checked against the stored weights fingerprint. [default: as the store records]")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output. [default: off]")
@with_storage_options
def eval_fidelity(run_dir, store, data, shards, derived, teacher, samples, teacher_weights, as_json, storage_options):
    """Per teacher, mean cosine between the student's head outputs and the cached targets, summary
    and patch tokens separately (normalised space and teacher space); with --derived, the cosine
    between derived targets and the teacher run live on the same pixels; with --store and --data
    alone, the cosine between what the store holds and its teacher recomputed from full-size decodes
    of the stored views (per view index, mean and worst).

    \b
    kdcache eval fidelity --run runs/r18
    kdcache eval fidelity --run runs/r18 --store heldout.zarr --data /data/heldout
    kdcache eval fidelity --store feats.zarr --data /data/shards --samples 64
    kdcache eval fidelity --store heldout.zarr --data /data/heldout --derived stored --derived sub-views --derived dense
    """
    apply_storage_options(storage_options, store, data)
    if not run_dir and not derived:
        if not (store and data):
            raise click.UsageError("--run, or --store and --data (the store against its teacher), or --derived")
        from kdcache.eval.teacher_fidelity import format_teacher_fidelity, teacher_fidelity
        r = teacher_fidelity(store, data, teacher=teacher, samples=samples or 32, weights=teacher_weights, progress=True)
        click.echo(json.dumps(r, indent=2) if as_json else format_teacher_fidelity(r))
        return
    samples = samples or 256
    if derived:
        if run_dir or not (store and data):
            raise click.UsageError("--derived measures a store's targets: give --store and --data, not --run")
        from kdcache.eval.derived_fidelity import derived_fidelity, format_derived
        r = derived_fidelity(store, data, options=derived, teacher=teacher, samples=samples, progress=True)
        click.echo(json.dumps(r, indent=2) if as_json else format_derived(r))
        return
    if not run_dir:
        raise click.UsageError("--run is required (or --derived with --store and --data)")
    from kdcache.eval.head_fidelity import fidelity, format_fidelity
    r = fidelity(run_dir, store=store, data=data, shards=shards)
    click.echo(json.dumps(r, indent=2) if as_json else format_fidelity(r))


@eval_group.command("accuracy")
@click.option("--run", "run_dir", required=True, help="A run trained with --logits-loss (its student has a classifier).")
@click.option("--data", help="The corpus to score on (held-out images for held-out figures). [default: the view-0 pixels "
              "of the run's store, when it keeps them]")
@click.option("--teacher", "-t", help="The teacher to agree with. [default: the first that gave soft labels]")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output. [default: off]")
@with_storage_options
def eval_accuracy(run_dir, data, teacher, as_json, storage_options):
    """Top-1/top-5 of the student's classifier against the corpus labels (when it has them), and its
    agreement with the teacher run live (top-1 agreement, mean KL) on every image.

    \b
    kdcache eval accuracy --run runs/kd --data /data/heldout
    kdcache eval accuracy --run runs/kd --data /data/heldout --teacher effnet --json
    """
    from kdcache.eval.accuracy import accuracy, format_accuracy
    apply_storage_options(storage_options, data)
    r = accuracy(run_dir, data, teacher=teacher, progress=True)
    click.echo(json.dumps(r, indent=2) if as_json else format_accuracy(r))


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
@click.option("--seed", type=int, default=ProbeOptions.seed, show_default=True, help="Seed of the kNN train/val split.")
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
    apply_storage_options(storage_options, data)
    r = make_report(run, data=data, knn=not no_knn, seed=seed, out=out)
    click.echo(json.dumps(r, indent=2) if as_json else r["report"])
