"""The README's promises: its test command is exactly what CI runs; every command has --help."""
from __future__ import annotations

import os
import re

import pytest
from click.testing import CliRunner

from kdcache.cli import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tests/ is one level below the root


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
                                     ["bench", "extract"], ["bench", "quantize"], ["bench", "train"], ["bench", "codec"]])
def test_every_command_has_help_with_examples(command):
    r = CliRunner().invoke(cli, [*command, "--help"])
    assert r.exit_code == 0 and "kdcache " + command[0] in r.output, r.output
