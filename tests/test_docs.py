"""The docs: the mkdocs site builds strictly; every ``kdcache ...`` command shown in README.md and
docs/ parses (a dry parse with the real command line, subcommands and option types included);
the Quickstart's commands run, in order, on a small image folder with tiny models swapped in;
README.md stays under 8 KB and its links to the docs resolve; no page is longer than ~300 lines
or speaks of work rounds instead of the software as it is."""
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
                # a shell variable stands for a value the script fills in ($SLURM_ARRAY_TASK_ID, $HEAD:29500)
                words = [re.sub(r"\$\{?[A-Za-z_]+\}?", "1", w) for w in shlex.split(part, comments=True)]
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
    assert len(text.encode()) < 8_000
    links = re.findall(r"\]\((docs/[^)#]+)(?:#[^)]*)?\)", text)
    assert links and all(os.path.exists(os.path.join(ROOT, link)) for link in links), links
    for section in ("kdcache demo", "python -m pytest -q", "| command |"):
        assert section in text
    for path in glob.glob(os.path.join(ROOT, "docs", "*.md")):  # every page is linked from the README
        assert f"docs/{os.path.basename(path)}" in text or path.endswith("index.md"), path


HISTORY = re.compile(r"\b(this|last|previous|next|first|second) round\b|\bround before\b|\bthis session\b|\bearlier round",
                     re.I)


@pytest.mark.parametrize("path", PAGES, ids=[os.path.relpath(p, ROOT) for p in PAGES])
def test_pages_describe_the_software_as_it_is_and_stay_readable(path):
    """History goes to CHANGELOG.md; a page stays under ~300 lines and its lines under 1,000 characters."""
    text = open(path, encoding="utf-8").read()
    found = [f"{os.path.relpath(path, ROOT)}:{text[:m.start()].count(chr(10)) + 1}: {m.group(0)!r}"
             for m in HISTORY.finditer(text)]
    assert not found, found
    lines = text.splitlines()
    assert len(lines) <= 320, f"{path}: {len(lines)} lines"  # (~300)
    long = [i + 1 for i, line in enumerate(lines) if len(line) > 1000]
    assert not long, f"{path}: lines {long} are longer than 1,000 characters"


QUICKSTART_SWAPS = [  # the page's real models, sizes and paths -> tiny ones that run here
    ("dino=vit_small_patch14_dinov2.lvd142m", "dino=vit_tiny_patch16_224,pretrained=false,img_size=32,depth=1"),
    ("--student resnet50", "--student resnet18,img_size=32"), ("--views 4", "--views 2"),
    ("--batch-size 128", "--batch-size 8"), ("--batch-size 256", "--batch-size 4"), ("--workers 8", "--workers 0"),
    ("--epochs 30", "--epochs 1"), ('"resnet50"', '"resnet18"'),
]


def test_the_quickstart_runs_end_to_end(tmp_path, monkeypatch, capsys):
    """Every command of docs/quickstart.md, in order, then its Python snippet, on an image folder of
    real images in class sub-folders (the page's /data/images), with tiny models swapped in."""
    from helpers import cli_call
    from PIL import Image

    from kdcache.data.demo_corpus import photo_images
    folder = tmp_path / "images"
    photos = photo_images()
    for i in range(12):  # crops of scikit-learn's two photos, in two classes
        label = "cat" if i % 2 else "dog"
        (folder / label).mkdir(parents=True, exist_ok=True)
        crop = photos[i % 2][20 * i:20 * i + 120, 30 * i:30 * i + 160]
        Image.fromarray(crop).save(folder / label / f"{i:04d}.jpg", quality=90)
    monkeypatch.chdir(tmp_path)
    page = os.path.join(ROOT, "docs", "quickstart.md")
    commands = [args for where, args in COMMANDS if where.startswith("docs/quickstart.md")]
    assert [a[0] for a in commands] == ["extract", "info", "verify", "train", "export", "eval", "report"]
    for args in commands:
        line = " ".join(shlex.quote(a) for a in args)
        for real, tiny in QUICKSTART_SWAPS:
            line = line.replace(real, tiny)
        line = line.replace("/data/images", str(folder))
        code, out, err = cli_call(monkeypatch, capsys, *shlex.split(line))
        assert code == 0, (line, err[-2000:])
    snippet = re.search(r"```python\n(.*?)```", open(page, encoding="utf-8").read(), re.S).group(1)
    for real, tiny in QUICKSTART_SWAPS:
        snippet = snippet.replace(real, tiny)
    import torch
    scope = {"images": torch.rand(2, 3, 32, 32)}  # what the snippet's reader holds
    exec(compile(snippet, page, "exec"), scope)  # noqa: S102 - the page's own snippet, run as a user would
    import safetensors.torch
    assert scope["features"].shape == (2, 512)  # resnet18's pooled features
    saved = safetensors.torch.load_file("runs/r50/student.safetensors")
    got = scope["model"].state_dict()
    assert all(torch.equal(got[k], v) for k, v in saved.items())  # the exported weights, loaded by timm
