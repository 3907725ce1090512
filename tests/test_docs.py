"""The docs: the mkdocs site builds strictly; every ``kdcache ...`` command shown in README.md and
docs/ parses (a dry parse with the real command line, subcommands and option types included);
README.md stays short and its links to the docs resolve."""
from __future__ import annotations

import glob
import os
import re
import shlex
import subprocess
import sys

import click
import pytest

from kdcache.cli import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = sorted(glob.glob(os.path.join(ROOT, "docs", "*.md"))) + [os.path.join(ROOT, "README.md")]


def _bash_lines(path: str):
    """(file:line, text) of every command line in the file's ```bash blocks, continuations joined."""
    text = open(path, encoding="utf-8").read()
    for m in re.finditer(r"```bash\n(.*?)```", text, re.S):
        start = text[:m.start()].count("\n") + 2
        joined, first = "", None
        for i, line in enumerate(m.group(1).splitlines()):
            first = first if joined else start + i
            joined += line.rstrip("\\").rstrip() + " " if line.endswith("\\") else line
            if not line.endswith("\\"):
                if joined.strip() and not joined.lstrip().startswith("#"):
                    yield f"{os.path.relpath(path, ROOT)}:{first}", joined
                joined = ""


def _kdcache_commands():
    """Each ``kdcache`` invocation: after ``kdcache``, ``.venv/bin/kdcache`` or ``-m kdcache``."""
    for path in PAGES:
        for where, line in _bash_lines(path):
            for part in re.split(r"\s&&\s|\s\|\s", line):
                words = shlex.split(part, comments=True)
                for i, w in enumerate(words):
                    if w in ("kdcache", ".venv/bin/kdcache"):  # `kdcache ...`, `torchrun ... -m kdcache ...`
                        yield where, words[i + 1:]
                        break


def dry_parse(args: list[str]) -> click.Context:
    """Parse ``kdcache ARGS`` down to the last subcommand without running anything."""
    ctx = cli.make_context("kdcache", list(args))
    cmd = cli
    while isinstance(cmd, click.Group):
        rest = [*getattr(ctx, "_protected_args", []), *ctx.args]
        name, sub, rest = cmd.resolve_command(ctx, rest)
        ctx = sub.make_context(name, rest, parent=ctx)
        cmd = sub
    return ctx


COMMANDS = list(_kdcache_commands())


def test_the_docs_show_commands():
    assert len(COMMANDS) > 30 and {w.split(":")[0] for w, _ in COMMANDS} >= {"README.md", "docs/training.md"}


@pytest.mark.parametrize("where,args", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_every_command_in_the_docs_parses(where, args):
    try:
        dry_parse(args)
    except click.exceptions.Exit:  # --help, --version
        pass
    except click.ClickException as e:
        raise AssertionError(f"{where}: kdcache {' '.join(args)}: {e.format_message()}") from None


def test_a_dry_parse_refuses_what_the_command_line_refuses():
    for bad in (["train", "--epochs", "ten"], ["extract", "D", "--out", "S", "-t", "x=y", "--dtype", "float8"],
                ["bench", "quantize", "--no-such-option"], ["store", "nope"]):
        with pytest.raises(click.ClickException):
            dry_parse(bad)


def test_the_site_builds_strictly(tmp_path):
    p = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", os.path.join(ROOT, "mkdocs.yml"),
                        "-d", str(tmp_path / "site")], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    for page in glob.glob(os.path.join(ROOT, "docs", "*.md")):
        name = os.path.splitext(os.path.basename(page))[0]
        built = tmp_path / "site" / ("index.html" if name == "index" else f"{name}/index.html")
        assert built.exists(), f"{page} is not in the site (mkdocs.yml nav)"


def test_readme_is_short_and_its_doc_links_resolve():
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    assert len(text.encode()) < 20_000
    links = re.findall(r"\]\((docs/[^)#]+)(?:#[^)]*)?\)", text)
    assert links and all(os.path.exists(os.path.join(ROOT, link)) for link in links), links
    for section in ("kdcache demo", "python -m pytest -q", "| command |"):
        assert section in text
    for path in glob.glob(os.path.join(ROOT, "docs", "*.md")):  # every page is linked from the README
        assert f"docs/{os.path.basename(path)}" in text or path.endswith("index.md"), path
