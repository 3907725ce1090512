"""The layout's promises, checked on the source and in fresh processes.

The package graph has one direction (``store`` <- ``data``, ``models`` <- ``targets`` <-
``quantize`` <- ``extract``, ``train`` <- ``eval`` <- ``bench`` <- ``cli``); ``train`` and
``eval`` never import ``extract``, and ``train`` never imports ``quantize`` (faiss); only
``store`` knows the store's paths; one module decodes (only ``data/pixels.py`` catches
``BadImage``); nothing unpickles; the command line starts without the heavy libraries, and a
training run on a float store never loads faiss.
"""
from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("data", "models", "targets", "extract", "quantize", "store", "train", "eval", "bench", "cli")
MODULES = ("errors.py", "demo.py", "__main__.py", "__init__.py")  # the root's own modules
# a package may import only packages of a lower rank (its own excepted); equal ranks are siblings that never meet
RANK = {"kdcache": 0, "errors": 0, "store": 1, "data": 2, "models": 2, "targets": 3, "quantize": 4, "extract": 5,
        "train": 5, "eval": 6, "demo": 7, "bench": 7, "cli": 8, "__main__": 9}
NEVER = {("train", "extract"), ("train", "quantize"), ("eval", "extract")}
HEAVY = ("torch", "timm", "faiss", "zarr", "webdataset")


def _files():
    for pkg in PACKAGES:
        for dirpath, _, files in os.walk(os.path.join(ROOT, pkg)):
            for f in sorted(files):
                if f.endswith(".py"):
                    yield os.path.relpath(os.path.join(dirpath, f), ROOT)
    for f in MODULES:
        yield f


def _sources(*packages):
    for path in _files():
        if path.split(os.sep)[0] in packages or path in packages:
            yield path, open(os.path.join(ROOT, path), encoding="utf-8").read()


def _owner(path: str) -> str:
    """The package (or root module) a file belongs to."""
    head = path.split(os.sep)[0]
    return "kdcache" if head == "__init__.py" else head[:-3] if head.endswith(".py") else head


def _imports(path: str, text: str):
    """(line, imported kdcache package or root module) for every import in the file, functions included."""
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "kdcache" or a.name.startswith("kdcache."):
                    yield node.lineno, (a.name.split(".") + ["kdcache"])[1] if "." in a.name else "kdcache"
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: inside the file's own package
                yield node.lineno, _owner(path)
            elif node.module == "kdcache":
                for a in node.names:
                    yield node.lineno, a.name if a.name in RANK else "kdcache"
            elif node.module and node.module.startswith("kdcache."):
                yield node.lineno, node.module.split(".")[1]


def test_the_package_graph_has_one_direction():
    bad = []
    for path, text in _sources(*PACKAGES, *MODULES):
        me = _owner(path)
        for line, other in _imports(path, text):
            if other == me:
                continue
            if (me, other) in NEVER or RANK[other] >= RANK[me]:
                bad.append(f"{path}:{line}: {me} imports {other}")
    assert not bad, "\n".join(bad)


def test_the_layout_check_sees_an_upward_import():
    found = list(_imports(os.path.join("store", "x.py"), "def f():\n    from kdcache.train.fit import fit\n"))
    assert found == [(2, "train")] and RANK["train"] > RANK["store"]


def test_only_store_knows_the_store_paths_and_root():
    outside = [p for p in PACKAGES if p != "store"]
    for path, text in _sources(*outside, *MODULES):
        assert not re.search(r"\.root\b", text), path
        assert not re.search(r"[\"'f](shards|stats|quantizers)/", text), path


def test_one_module_decodes_images():
    for path, text in _sources(*PACKAGES, *MODULES):
        if path != os.path.join("data", "pixels.py"):
            assert not re.search(r"except\s*\(?[^:\n]*BadImage", text), f"{path} catches BadImage: decoding is data/pixels.py's"
            assert "decode_sample(" not in text and "decode_image(" not in text, f"{path} decodes images itself"


def test_module_names_say_what_they_hold():
    """No two modules of the same name (options.py: each package's options dataclass, the same job)."""
    seen = {}
    for path in _files():
        name = os.path.basename(path)
        if name not in ("__init__.py", "options.py", "__main__.py"):
            assert name not in seen, f"{path} and {seen[name]}"
            seen[name] = path


# torch.load only with weights_only=True; safetensors.torch.load (tensors from bytes, no pickle) is not torch.load
@pytest.mark.parametrize("pattern", [r"import pickle", r"pickle\.", r"(?<!safetensors\.)torch\.load\(", r"(^|[^.\w])eval\("])
def test_nothing_unpickles_or_evaluates(pattern):
    for path, text in _sources(*PACKAGES, *MODULES):
        for line in text.splitlines():
            if re.search(pattern, line) and not ("torch" in pattern and "weights_only=True" in line):
                raise AssertionError(f"{path}: {line.strip()}")


PROBE = """
import json, sys
args = json.loads(sys.argv[1])
from kdcache.cli import main
if args is not None:
    sys.argv = ["kdcache", *args]
    try:
        main()
    except SystemExit:
        pass
with open({out!r}, "w") as f:
    json.dump(sorted(m for m in {heavy!r} if m in sys.modules), f)
"""


def _loaded(tmp_path, args, env=None) -> tuple[list[str], subprocess.CompletedProcess]:
    """The heavy libraries a fresh process holds after ``kdcache ARGS`` (None: after importing the CLI only)."""
    out = str(tmp_path / f"loaded-{abs(hash(str(args)))}.json")
    script = PROBE.format(out=out, heavy=HEAVY)
    argv = [sys.executable, "-c", script, json.dumps(args)]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})
    with open(out) as f:
        return json.load(f), p


def _command_paths(group=None, prefix=()):
    import click

    from kdcache.cli import cli
    group = group or cli
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            yield prefix + (name,)
            yield from _command_paths(cmd, prefix + (name,))
        else:
            yield prefix + (name,)


def test_importing_the_cli_loads_no_heavy_library(tmp_path):
    loaded, p = _loaded(tmp_path, None)
    assert loaded == [], (loaded, p.stderr)


def test_version_and_every_help_load_no_heavy_library(tmp_path):
    for args in [["--version"], ["--help"], *[[*path, "--help"] for path in _command_paths()]]:
        loaded, p = _loaded(tmp_path, args)
        assert loaded == [] and "Traceback" not in p.stderr, (args, loaded, p.stderr[-2000:])


@pytest.mark.parametrize("args", [["info", "STORE"], ["verify", "STORE"], ["store", "ls", "STORE"], ["info", "STORE", "--json"]])
def test_store_metadata_commands_load_no_torch_timm_or_faiss(tmp_path, vit_store, args):
    loaded, p = _loaded(tmp_path, [vit_store if a == "STORE" else a for a in args])
    assert "Traceback" not in p.stderr and set(loaded) <= {"zarr"}, (loaded, p.stderr[-2000:])


def test_training_on_a_float_store_never_loads_faiss(tmp_path, vit_store, corpus):
    loaded, p = _loaded(tmp_path, ["train", "--store", vit_store, "--data", corpus, "--student",
                                   "vit_tiny_patch16_224,img_size=32,depth=1", "--out", str(tmp_path / "run"), "--epochs",
                                   "1", "--batch-size", "4", "--workers", "0", "--head-hidden", "16", "--amp", "none",
                                   "--no-progress"], env={"OMP_NUM_THREADS": "1"})
    assert os.path.exists(tmp_path / "run" / "checkpoints" / "last" / "state.json"), p.stderr[-3000:]
    assert "torch" in loaded and "faiss" not in loaded, loaded
