"""The root of the command line: the ``kdcache`` group, options shared by several commands, and
``main`` (a ``KdcacheError`` or a bad option becomes one line on stderr and exit code 2).

Commands live beside this module by job: ``pipeline`` (extract, quantize, train, export, demo,
convert), ``stores`` (info, verify, store ...), ``evaluate`` (eval ..., report), ``bench``
(bench ...). Each parses its options and makes one call into the packages. Unset options stay
None and are dropped, so defaults live in one place (the options dataclasses), and help texts
read them there. Nothing heavy is imported here or at the top of a command module: torch,
timm, faiss, zarr and webdataset load inside the command that needs them, so ``kdcache --help``
and every ``--help`` answer at once.
"""
from __future__ import annotations

import dataclasses
import logging
import sys

import click

from kdcache import __version__
from kdcache.errors import KdcacheError, one_line


def drop_unset(**kwargs) -> dict:
    """The options the user gave (click leaves the others None): the dataclass keeps its defaults."""
    return {k: v for k, v in kwargs.items() if v is not None}


def defaults_of(cls):
    """``D = defaults_of(Options)``; ``D("name")`` is the help text's ' [default: X]' for a field of an
    options dataclass (or of a mapping of defaults): the one place the default lives."""
    fields = {} if isinstance(cls, dict) else {f.name: f for f in dataclasses.fields(cls)}

    def default(name: str) -> str:
        if isinstance(cls, dict):
            value = cls[name]
        else:
            f = fields[name]
            value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if isinstance(value, tuple):
            value = ",".join(map(str, value))
        return f" [default: {'none' if value is None else value}]"
    return default


def comma_ints(option: str, text: str | None, *, low: int = 1) -> tuple[int, ...] | None:
    """``--views 1,2,8`` -> (1, 2, 8); None stays None (the dataclass default)."""
    if text is None:
        return None
    try:
        out = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected comma-separated integers", param_hint=option) from None
    if not out or min(out) < low:
        raise click.BadParameter(f"{text!r}: expected comma-separated integers >= {low}", param_hint=option)
    return out


def comma_names(text: str | None) -> tuple[str, ...] | None:
    return None if text is None else tuple(x.strip() for x in text.split(",") if x.strip())


def with_storage_options(fn):
    """``--storage-option key=value`` (repeatable), for commands that take STORE or DATA."""
    return click.option("--storage-option", "storage_options", multiple=True, metavar="KEY=VALUE",
                        help="fsspec option for remote STORE/DATA (e.g. endpoint_url=..., anon=true); repeat; "
                             "credentials also come from the filesystem's environment. [default: none]")(fn)


def apply_storage_options(options, *urls):
    from kdcache.store.remote import configure, parse_storage_options
    configure(parse_storage_options(options), [u for u in urls if u])


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="kdcache", message="%(prog)s %(version)s")
@click.option("-v", "--verbose", is_flag=True, help="kdcache's debug logging on stderr, and faiss's per-clustering warnings. [default: off]")
def cli(verbose):
    """kdcache: run teachers once, cache their features, distil students from the cache.

    \b
    kdcache demo                                  # the whole pipeline on embedded real images
    kdcache extract DATA --out STORE --teacher vit=vit_small_patch16_224
    kdcache train --store STORE --data DATA --student resnet18 --out RUN
    kdcache info STORE
    kdcache verify STORE --data DATA
    """
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    # kdcache's debug logs (and faiss's own warnings, quantize.methods) with -v; never zarr's or fsspec's
    logging.getLogger("kdcache").setLevel(logging.DEBUG if verbose else logging.INFO)
    for noisy in ("faiss", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


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
