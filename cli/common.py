"""The root of the command line: the ``kdcache`` group, options shared by several commands, and
``main`` (a ``KdcacheError`` or a bad option becomes one line on stderr and exit code 2).

Commands live beside this module by job: ``pipeline`` (extract, quantize, train, export, demo,
convert), ``stores`` (info, verify, store ...), ``evaluate`` (eval ..., bench ...). Each parses
its options and makes one call into the packages. Unset options stay None and are dropped, so
library defaults live in one place (the options dataclasses), and help texts read them there.
"""
from __future__ import annotations

import dataclasses
import logging
import sys

import click

from kdcache import __version__
from kdcache.store import KdcacheError
from kdcache.store.errors import one_line


def drop_unset(cls, **kwargs):
    return cls(**{k: v for k, v in kwargs.items() if v is not None})


def _default(cls, name: str) -> str:
    """'[default: X]' for a field of an options dataclass: the one place the default lives."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    return f" [default: {value}]"


def with_storage_options(fn):
    """``--storage-option key=value`` (repeatable), for commands that take STORE or DATA."""
    return click.option("--storage-option", "storage_options", multiple=True, metavar="KEY=VALUE",
                        help="fsspec option for remote STORE/DATA (e.g. endpoint_url=..., anon=true); repeat; "
                             "credentials also come from the filesystem's environment. [default: none]")(fn)


def apply_storage_options(options, *urls):
    from kdcache.store.remote import configure, parse_storage_options
    configure(parse_storage_options(options), urls)


def extract_default(name):
    from kdcache.extract import ExtractOptions
    return _default(ExtractOptions, name)


def train_default(name):
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


def with_bench_options(fn):
    """--repeat and --json, the same on every bench subcommand (eval.harness)."""
    fn = click.option("--json", "as_json", is_flag=True, help="All repetitions and the environment as JSON. [default: off]")(fn)
    return click.option("--repeat", type=click.IntRange(min=1), default=5, show_default=True,
                        help="Timed repetitions after one warm-up, sides interleaved.")(fn)


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
