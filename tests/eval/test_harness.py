"""eval.harness: known ratios come out right, sides interleave, every bench prints medians and spreads."""
from __future__ import annotations

import json
import re
import time

import numpy as np
import pytest
from conftest import run_cli

from kdcache.eval.harness import Spread, Timed, limit_note, measure

SPREAD = re.compile(r"[\d,.]+ \([\d,.]+-[\d,.]+\)")  # "median (min-max)"


def test_two_sleeps_of_known_ratio():
    m = measure({"fast": lambda: time.sleep(0.010), "slow": lambda: time.sleep(0.020)}, repeat=7)
    assert abs(m.ratio("fast", "slow").median - 2.0) < 0.2  # rate ratio: fast does twice the work per second
    assert abs(m.ratio("slow", "fast", of="time").median - 2.0) < 0.2
    assert m.time("fast").low <= m.time("fast").median <= m.time("fast").high


def test_sides_interleave_after_warm_up_and_every_repetition_is_kept():
    calls = []
    m = measure({"a": lambda: calls.append("a"), "b": lambda: calls.append("b"), "c": lambda: calls.append("c")},
                repeat=4, warmup=1)
    assert calls == ["a", "b", "c"] * 5 and m.order == ["a", "b", "c"] * 4
    d = m.to_dict()
    assert d["repeat"] == 4 and len(d["seconds"]["b"]) == 4 and d["order"] == m.order


def test_a_side_may_time_itself_and_count_its_items():
    m = measure({"x": lambda: Timed(items=10, seconds=2.0), "y": lambda: 5}, repeat=3)
    assert m.seconds["x"] == [2.0] * 3 and m.rate("x").median == 5.0 and m.items["y"] == 5


def test_ratio_spread_is_pairwise_and_an_impossible_gain_is_flagged():
    ticks = iter([0, 1, 1, 3, 3, 4, 4, 8])  # rounds: a=1 b=2, a=1 b=4
    m = measure({"a": lambda: None, "b": lambda: None}, repeat=2, warmup=0, clock=lambda: next(ticks))
    assert m.ratio("a", "b") == Spread(3.0, 2.0, 4.0)
    assert "noise" in limit_note(Spread(1.05, 0.97, 1.1), "x") and limit_note(Spread(0.95, 0.9, 0.99), "x") == ""


def _table_rows(text):
    return [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| side")
            and not line.startswith("| codec") and not line.startswith("| method") and not line.startswith("| device")]


def test_bench_extract_and_train_end_to_end_print_medians_and_spreads(vit_spec):
    out = run_cli("bench", "extract", "-t", vit_spec, "--images", "8", "--batch-size", "4", "--workers", "0",
                  "--repeat", "2").stdout
    assert "warm-up + 2 interleaved repetitions" in out and "torch threads" in out and "load" in out
    rows = _table_rows(out)
    assert len(rows) == 2 and all(SPREAD.search(r) for r in rows) and SPREAD.search(out.split("ratio ")[-1])
    out = run_cli("bench", "train", "-t", vit_spec, "-s", "vit_tiny_patch16_224,img_size=32,depth=1", "--images", "16",
                  "--batch-size", "4", "--steps", "2", "--workers", "0", "--repeat", "2").stdout
    rows = _table_rows(out)
    assert len(rows) == 5 and all(len(SPREAD.findall(r)) == 2 for r in rows), out
    for ratio in ("a/b = ", "b/c = ", "b'/c = "):
        assert SPREAD.match(out.split(ratio)[1]), ratio
    d = json.loads(run_cli("bench", "train", "-t", vit_spec, "-s", "vit_tiny_patch16_224,img_size=32,depth=1", "--images",
                           "16", "--batch-size", "4", "--steps", "2", "--workers", "0", "--repeat", "2", "--json").stdout)
    assert d["measurement"]["order"] == ["a", "b", "c", "b'", "loader"] * 2 and d["environment"]["cpus"] >= 1


def test_bench_codec_and_quantize_print_medians_and_spreads(tmp_path):
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((4096, 64)).astype(np.float32))
    out = run_cli("bench", "codec", "--npy", str(tmp_path / "x.npy"), "--repeat", "2").stdout
    rows = _table_rows(out)
    assert [r.split("|")[1].strip() for r in rows] == ["none", "lz4", "zstd"] and all(len(SPREAD.findall(r)) == 2 for r in rows)
    out = run_cli("bench", "quantize", "--npy", str(tmp_path / "x.npy"), "--methods", "pq,sq8", "--fractions", "16",
                  "--train-tokens", "2000", "--repeat", "2").stdout
    rows = _table_rows(out)
    assert len(rows) == 3 and all(SPREAD.search(r) for r in rows), out  # pq, sq8, and the decoder row


@pytest.mark.parametrize("repeat", ["0", "x"])
def test_repeat_must_be_a_positive_integer(repeat):
    p = run_cli("bench", "codec", "--npy", "x.npy", "--repeat", repeat, check=False)
    assert p.returncode == 2 and "--repeat" in p.stderr and "Traceback" not in p.stderr


def test_bench_load_local_and_on_loopback_s3_with_verification_on_and_off(vit_spec):
    out = run_cli("bench", "load", "-t", vit_spec, "--images", "32", "--workers", "1", "--repeat", "2").stdout
    rows = _table_rows(out)
    assert [r.split("|")[1].strip() for r in rows] == [
        "local, verification on", "local, verification off", "s3 (loopback moto), verification on",
        "s3 (loopback moto), verification off"]
    assert all(len(SPREAD.findall(r)) == 2 for r in rows), out
    assert SPREAD.search(out.split("local: verified / unverified throughput = ")[1])
