"""The command line: README's test command is what CI runs; --help with examples and defaults on every
command; bad options are one line and exit 2."""
from __future__ import annotations

import os
import re

import click
import pytest
from click.testing import CliRunner
from helpers import cli_call, one_error_line

from kdcache import __version__
from kdcache.cli import cli

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/cli/ is two levels below


def _readme_commands():
    text = open(os.path.join(ROOT, "README.md")).read()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    return [line for b in blocks[:2] for line in b.splitlines() if line and not line.startswith("#")]


def test_readme_opens_with_demo_and_test_commands_and_ci_runs_the_test_command():
    demo, tests = _readme_commands()
    assert demo.endswith("kdcache demo") and "pip install torch==2.14.1 torchvision==0.29.1" in demo
    assert tests.endswith("python -m pytest -q")
    ci = open(os.path.join(ROOT, ".ci", "run")).read().splitlines()
    assert tests in ci


@pytest.mark.parametrize("command", [["extract"], ["info"], ["verify"], ["quantize"], ["train"], ["export"], ["demo"],
                                     ["bench", "extract"], ["bench", "quantize"], ["bench", "train"], ["bench", "codec"],
                                     ["bench", "load"], ["eval", "knn"], ["eval", "linear"], ["eval", "store"], ["eval", "fidelity"], ["convert"], ["store", "copy"], ["store", "merge"],
                                     ["store", "subset"], ["store", "drop-teacher"], ["store", "stats"], ["store", "ls"]])
def test_every_command_has_help_with_examples(command):
    r = CliRunner().invoke(cli, [*command, "--help"])
    assert r.exit_code == 0 and "kdcache " + " ".join(command) in r.output, r.output


def _commands(group=cli, prefix=()):
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, prefix + (name,))
        else:
            yield prefix + (name,), cmd


def test_version(monkeypatch, capsys):
    code, out, _ = cli_call(monkeypatch, capsys, "--version")
    assert code == 0 and out.strip() == f"kdcache {__version__}"


def test_every_option_has_help_that_shows_its_default_and_no_short_flag_clashes():
    for path, cmd in _commands():
        longs = {o for p in cmd.params for o in p.opts if o.startswith("--")}
        for p in cmd.params:
            if not isinstance(p, click.Option):
                continue
            where = f"kdcache {' '.join(path)} {p.opts[0]}"
            assert p.help, f"{where}: no help"
            assert p.required or p.show_default or "default:" in p.help or "required" in p.help, f"{where}: default not shown"
            for short in (o for o in p.opts if not o.startswith("--")):
                assert "-" + short not in longs, f"{where}: short flag {short} reads like long option -{short}"


@pytest.mark.parametrize("args,match", [
    (["--workers", "-1"], "--workers -1: need an integer >= 0"),
    (["--batch-size", "0"], "--batch-size 0: need an integer >= 1"),
    (["--views", "0"], "--views 0: need an integer >= 1"),
    (["-t", "t=resnet18,mean=1:2"], "mean must be three numbers"),
    (["-t", "t=resnet18,img_size=0"], "img_size must be a positive integer"),
    (["-t", "t="], "expected NAME=MODEL"),
    (["-t", "resnet18"], "expected NAME=MODEL"),
    (["--dtype", "float8"], "'float8' is not one of"),
])
def test_bad_extract_options_are_one_line_and_exit_2(tmp_path, corpus, monkeypatch, capsys, args, match):
    base = {"-t": "t=resnet18,pretrained=false"}
    if "-t" in args:
        base = {}
    argv = ["extract", corpus, "--out", str(tmp_path / "s.zarr"), "--no-progress", *[x for kv in base.items() for x in kv], *args]
    code, _, err = cli_call(monkeypatch, capsys, *argv)
    assert code == 2 and match in one_error_line(err)
    assert not os.path.exists(tmp_path / "s.zarr")


@pytest.mark.parametrize("args,match", [
    (["--batch-size", "0"], "--batch-size 0: expected an integer >= 1"),
    (["--epochs", "-1"], "--epochs -1: expected an integer >= 1"),
    (["--lr", "nan"], "--lr nan: expected a finite number > 0"),
    (["--teacher-weight", "vit=x"], "--teacher-weight 'vit=x'"),
    (["--out", "AFILE"], "exists and is not a directory"),
])
def test_bad_train_options_are_one_line_and_exit_2(tmp_path, monkeypatch, capsys, args, match):
    (tmp_path / "afile").write_text("x")
    args = [str(tmp_path / "afile") if a == "AFILE" else a for a in args]
    base = ["train", "--store", "s.zarr", "--data", "d", "--student", "resnet18"]
    if "--out" not in args:
        base += ["--out", str(tmp_path / "run")]
    code, _, err = cli_call(monkeypatch, capsys, *base, *args)
    assert code == 2 and match in one_error_line(err)


def test_a_typo_in_a_config_file_is_an_error(tmp_path, monkeypatch, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("store: s.zarr\ndata: d\nstudent: resnet18\nout: r\nview_choice: randon\n")
    code, _, err = cli_call(monkeypatch, capsys, "train", "--config", str(cfg))
    assert code == 2 and "--view-choice 'randon': expected one of epoch, random, first" in one_error_line(err)
    cfg.write_text("store: s.zarr\ndata: d\nstudent: resnet18\nout: r\nepochs: ten\n")
    code, _, err = cli_call(monkeypatch, capsys, "train", "--config", str(cfg))
    assert code == 2 and "--epochs 'ten'" in one_error_line(err)


@pytest.mark.parametrize("args,match", [(["--m", "0"], "M=0, need an integer in 1..4096"),
                                        (["--beam", "0"], "beam=0, need an integer >= 1"),
                                        (["--sample-tokens", "0"], "--train-tokens 0: need an integer >= 1"),
                                        (["-m", "rq"], "No such option '-m'. (see kdcache quantize --help)")])
def test_bad_quantize_options_are_one_line_and_exit_2(tmp_path, monkeypatch, capsys, args, match):
    method = [] if "-m" in args else ["--method", "rq"]
    code, _, err = cli_call(monkeypatch, capsys, "quantize", str(tmp_path / "none.zarr"), "-t", "vit", *method, *args)
    assert code == 2 and match in one_error_line(err)
