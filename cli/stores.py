"""Store commands: info, verify, and ``kdcache store ...`` (copy, merge, subset, drop-teacher, stats, ls)."""
from __future__ import annotations

import json
import sys

import click

from .common import apply_storage_options, cli, with_storage_options


@cli.command()
@click.argument("store")
@click.option("--check", is_flag=True, help="Read every shard's own metadata instead of the shard index (one request per "
              "shard) and flag the shards a reader would refuse. [default: off, the index]")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output. [default: off]")
@with_storage_options
def info(store, check, as_json, storage_options):
    """Describe STORE: teachers, views, shards, samples, failures, bytes, the digest that pins it.

    \b
    kdcache info feats.zarr
    kdcache info feats.zarr --check             # every shard's own metadata, not the index's word
    kdcache info s3://bucket/feats --json | jq .teachers
    """
    from kdcache.store.inspect import describe_store
    apply_storage_options(storage_options, store)
    d = describe_store(store, check=check)
    click.echo(json.dumps(d, indent=2) if as_json else d["text"])


@cli.command()
@click.argument("store")
@click.option("--data", help="Also check that the store's keys match this corpus (read with the options the store "
                             "recorded). [default: store only]")
@click.option("--metadata-only", is_flag=True, help="Check every shard's metadata, array shapes and the shard index, "
              "without reading the arrays' data (fast; digests unchecked). [default: off, everything]")
@click.option("--teacher-check", type=click.IntRange(min=1), help="With --data: also recompute every stored view of N "
              "sampled images with the teacher the store names (its weights must load here, and match the stored "
              "fingerprint) and report the cosine; a float store whose worst view is below 0.99 is a mismatch. [default: off]")
@click.option("--teacher-weights", help="With --teacher-check: the teacher's checkpoint here, when the path the store "
              "records is another machine's. [default: as the store records]")
@click.option("--pin", help="SHA256 the store must still be (kdcache info's 'pin' line, taken where the store was "
              "trusted): its shard index unchanged, listing exactly its complete shards, each with its binding. "
              "[default: none]")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output. [default: off]")
@with_storage_options
def verify(store, data, metadata_only, teacher_check, teacher_weights, pin, as_json, storage_options):
    """Run on every shard of STORE every check its readers make (bindings, digests, block checksums,
    finiteness, counts), and the shard index against the shards; with --data every image against
    the bytes extracted; exit 1 on a mismatch.

    \b
    kdcache verify feats.zarr
    kdcache verify feats.zarr --data /data/shards
    kdcache verify feats.zarr --pin 3f2a...e9     # the digest kdcache info printed where the store was made
    kdcache verify feats.zarr --data /data/shards --teacher-check 16
    kdcache verify s3://bucket/feats.zarr --metadata-only
    """
    apply_storage_options(storage_options, store, data)
    if teacher_check and not data:
        raise click.UsageError("--teacher-check recomputes views from the images: give --data")
    if data is None:  # the store alone: metadata and digests, no corpus code (and no torch) loaded
        from kdcache.store.verify import verify_store
        report = verify_store(store, progress=True, data=not metadata_only, pin=pin)
    else:
        from kdcache.data.corpus_keys import verify_with_corpus
        report = verify_with_corpus(store, data, progress=True, metadata_only=metadata_only, pin=pin)
    fidelity = None
    if teacher_check:
        from kdcache.eval.teacher_fidelity import fidelity_problems, format_teacher_fidelity, teacher_fidelity
        fidelity = teacher_fidelity(store, data, samples=teacher_check, weights=teacher_weights, progress=True)
        report.problems += fidelity_problems(fidelity)
    if as_json:
        click.echo(json.dumps({**report.to_dict(), **({"teacher_check": fidelity} if fidelity else {})}, indent=2))
    else:
        if fidelity:
            click.echo(format_teacher_fidelity(fidelity) + "\n")
        for p in report.problems:
            click.echo(f"MISMATCH {p}")
        click.echo(report.line())
    sys.exit(1 if report.problems else 0)


@cli.group("store")
def store_group():
    """Operations on whole stores: copy, merge, subset, add the views' pixels, drop a teacher,
    statistics, list shards.

    \b
    kdcache store copy s3://team-a/feats.zarr feats.zarr
    kdcache store pixels feats.zarr --data /data/shards
    kdcache store merge part-a.zarr part-b.zarr --out all.zarr
    kdcache store ls feats.zarr --json
    """


@store_group.command("copy")
@click.argument("src")
@click.argument("dst")
@click.option("--format", "store_format", type=click.Choice(["1", "2", "3"]),
              help="Write DST in this store format: 3 records each image's place in its corpus shard and may keep the "
                   "views' pixels (what kdcache writes; a store copied up to 3 from an older one has no origin); 2 "
                   "stores each view of a block as a Zarr shard of its own; 1 as kdcache read stores before. "
                   "[default: SRC's]")
@click.option("--no-progress", is_flag=True, help="No progress bar. [default: off]")
@with_storage_options
def store_copy(src, dst, store_format, no_progress, storage_options):
    """Copy SRC to DST (local <-> remote) shard by shard; resumable, each shard verified after the copy.

    \b
    kdcache store copy s3://team-a/feats.zarr feats.zarr --storage-option endpoint_url=https://s3.example.org
    kdcache store copy feats.zarr s3://team-b/feats.zarr
    kdcache store copy old-k4.zarr new-k4.zarr --format 2   # a format-1 store, one view read per block
    """
    from kdcache.store.ops import copy_stores
    apply_storage_options(storage_options, src, dst)
    click.echo(json.dumps(copy_stores([src], dst, progress=not no_progress,
                                      store_format=int(store_format) if store_format else None), indent=2))


@store_group.command("merge")
@click.argument("stores", nargs=-1, required=True)
@click.option("--out", "-o", required=True, help="The merged store (new, or one to add to).")
@click.option("--no-progress", is_flag=True, help="No progress bar. [default: off]")
@with_storage_options
def store_merge(stores, out, no_progress, storage_options):
    """Merge STORES (same teachers, views, format and corpus) into --out; shards must be disjoint or identical.

    \b
    kdcache store merge rank-a.zarr rank-b.zarr --out feats.zarr
    """
    from kdcache.store.ops import copy_stores
    apply_storage_options(storage_options, out, *stores)
    click.echo(json.dumps(copy_stores(list(stores), out, progress=not no_progress), indent=2))


@store_group.command("subset")
@click.argument("store")
@click.option("--shards", required=True, help="Glob of shard names to keep, e.g. 'train-0000*'.")
@click.option("--out", "-o", required=True, help="The new store.")
@click.option("--no-progress", is_flag=True, help="No progress bar. [default: off]")
@with_storage_options
def store_subset(store, shards, out, no_progress, storage_options):
    """Copy the shards of STORE matching --shards into --out (train on them with the full --data).

    \b
    kdcache store subset feats.zarr --shards 'train-00000*' --out small.zarr
    """
    from kdcache.store.ops import copy_stores
    apply_storage_options(storage_options, store, out)
    click.echo(json.dumps(copy_stores([store], out, shards=shards, progress=not no_progress), indent=2))


@store_group.command("pixels")
@click.argument("store")
@click.option("--data", required=True, help="The corpus the store was extracted from.")
@click.option("--pixels", "pixels", help="[SIZE][:jpeg[QUALITY]|:raw] as for extract --pixels. [default: the largest "
              "teacher input, JPEG quality 90; a store that keeps pixels keeps its own]")
@click.option("--workers", type=click.IntRange(min=0), default=1, show_default=True, help="DataLoader processes that "
              "decode and encode.")
@click.option("--no-progress", is_flag=True, help="No progress bar. [default: off]")
@with_storage_options
def store_pixels(store, data, pixels, workers, no_progress, storage_options):
    """Give STORE its views' pixels from its corpus (one decode pass, no teacher), so students train
    from the store alone; shards that have them are skipped (re-running resumes).

    \b
    kdcache store pixels feats.zarr --data /data/shards
    kdcache store pixels feats.zarr --data /data/shards --pixels 112:jpeg95 --workers 8
    """
    from kdcache.extract.store_pixels import add_pixels
    apply_storage_options(storage_options, store, data)
    click.echo(json.dumps(add_pixels(store, data, pixels, workers=workers, progress=not no_progress), indent=2))


@store_group.command("drop-teacher")
@click.argument("store")
@click.argument("name")
@with_storage_options
def store_drop_teacher(store, name, storage_options):
    """Remove teacher NAME from STORE: its arrays in every shard, codebooks and statistics.

    \b
    kdcache store drop-teacher feats.zarr clip
    """
    from kdcache.store.ops import drop_teacher
    apply_storage_options(storage_options, store)
    click.echo(json.dumps(drop_teacher(store, name), indent=2))


@store_group.command("stats")
@click.argument("store")
@click.option("--teacher", "-t", "teachers", multiple=True, help="Teachers to compute (repeat). [default: all]")
@with_storage_options
def store_stats(store, teachers, storage_options):
    """(Re)compute the normalisation statistics of STORE's teachers and write them into it; rewrite
    its summary and shard index from every shard's own metadata.

    \b
    kdcache store stats feats.zarr
    kdcache store stats s3://bucket/feats.zarr -t dino
    """
    from kdcache.targets.stats import write_stats_of
    apply_storage_options(storage_options, store)
    click.echo(json.dumps(write_stats_of(store, list(teachers) or None), indent=2))


@store_group.command("ls")
@click.argument("store")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output. [default: off]")
@with_storage_options
def store_ls(store, as_json, storage_options):
    """List the shards of STORE: state, samples, failures, bytes, teachers, and the holder of any lease.

    \b
    kdcache store ls feats.zarr
    kdcache store ls s3://bucket/feats.zarr --json
    """
    from kdcache.store.ops import format_ls, list_shards
    apply_storage_options(storage_options, store)
    d = list_shards(store)
    click.echo(json.dumps(d, indent=2) if as_json else format_ls(d))
