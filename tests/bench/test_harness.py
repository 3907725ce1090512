"""bench.harness: known ratios come out right, sides interleave, every bench prints medians and spreads."""
from __future__ import annotations

import json
import os
import re
import statistics

import numpy as np
import pytest
from conftest import run_cli

from kdcache.bench.harness import Spread, Timed, lasting, limit_note, measure

SPREAD = re.compile(r"[\d,.]+ \([\d,.]+-[\d,.]+\)")  # "median (min-max)"


def test_two_sides_of_known_ratio_on_a_clock_they_advance():
    """No wall clock: each side advances a fake clock by its cost (slow: twice fast's, with a
    little noise), so the ratios are known exactly."""
    now = [0.0]
    noise = iter([1.0, 1.1, 0.9, 1.0, 1.05, 0.95, 1.0, 1.02] * 4)

    def cost(seconds):
        def side():
            now[0] += seconds * next(noise)
        return side
    m = measure({"fast": cost(0.010), "slow": cost(0.020)}, repeat=7, clock=lambda: now[0])
    assert m.ratio("fast", "slow").median == pytest.approx(2.0, rel=0.15)  # rate ratio: twice the work per second
    assert m.ratio("slow", "fast", of="time").median == pytest.approx(2.0, rel=0.15)
    assert m.time("fast").low <= m.time("fast").median <= m.time("fast").high


def test_a_lasting_side_makes_the_same_passes_every_timed_run_counted_from_its_warm_up(monkeypatch):
    """``lasting``: the warm-up makes two passes and times the second (the first also starts what
    persists: here it costs 10x), then every call makes ceil(seconds / pass) passes."""
    import kdcache.bench.harness as harness
    now, passes = [0.0], []

    def epoch():
        passes.append(1)
        now[0] += 0.5 if len(passes) == 1 else 0.05  # a slow first pass (workers starting), then 50 ms each
        return 10
    monkeypatch.setattr(harness.time, "perf_counter", lambda: now[0])
    side = lasting(epoch, 0.32)
    m = measure({"a": side}, repeat=3, clock=lambda: now[0])
    assert side.passes == [7]  # ceil(0.32 / 0.05), not ceil(0.32 / 0.5) from the first pass
    assert len(passes) == 2 + 3 * 7 and m.items["a"] == 70
    assert m.seconds["a"] == pytest.approx([0.35] * 3) and m.rate("a").median == pytest.approx(200)
    zero = lasting(lambda: 1, 0)  # seconds 0: one pass per timed run, after the warm-up's two
    assert zero() == 2 and zero.passes == [1] and zero() == 1
    timed = lasting(lambda: Timed(3, 0.1), 0.25)  # passes that time themselves: counted from, and summed by, their own
    assert timed() == Timed(6, 0.2) and timed.passes == [3] and timed() == Timed(9, pytest.approx(0.3))


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
            and not line.startswith("| codec") and not line.startswith("| method") and not line.startswith("| device")
            and not line.startswith("| long side") and not line.startswith("| where")
            and not line.startswith("| student input") and not line.startswith("| workers")]


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
    assert [r.split("|")[1].strip() for r in rows] == ["none", "lz4", "zstd"] and all(len(SPREAD.findall(r)) == 3 for r in rows)
    assert "`--codec auto` picks **none**" in out  # random normal values: lz4 saves nothing
    out = run_cli("bench", "quantize", "--npy", str(tmp_path / "x.npy"), "--methods", "pq,sq8", "--fractions", "16",
                  "--train-tokens", "2000", "--repeat", "2").stdout
    rows = _table_rows(out)
    assert len(rows) == 3 and all(SPREAD.search(r) for r in rows), out  # pq, sq8, and the decoder row


@pytest.mark.parametrize("repeat", ["0", "x"])
def test_repeat_must_be_a_positive_integer(repeat):
    p = run_cli("bench", "codec", "--npy", "x.npy", "--repeat", repeat, check=False)
    assert p.returncode == 2 and "--repeat" in p.stderr and "Traceback" not in p.stderr


def test_bench_load_local_and_on_loopback_s3_with_verification_on_and_off(vit_spec):
    # 96 images x 4 tokens: past the 256 training tokens a quantizer needs (a fifth is held out)
    out = run_cli("bench", "load", "-t", vit_spec, "--images", "96", "--workers", "1", "--repeat", "2", "--codes", "pq:M=8",
                  "--decode-sizes", "100,500", "--decode-images", "4", "--pixel-sizes", "32", "--pixel-images", "96",
                  "--pixel-long-side", "64", "--pixel-workers", "1", "--seconds", "0").stdout
    rows = _table_rows(out)
    assert [r.split("|")[1].strip() for r in rows] == [
        "decode floor (decode + view, no store)", "local, no target arrays (keys and views only)", "local, verification on",
        "local, verification off", "local, patch codes, verification on",
        "s3 (loopback moto), verification on", "s3 (loopback moto), verification off",
        "local", "s3 (loopback moto)",  # block reads: kdcache's against zarr's own
        *["1"] * 7,  # pixels, 1 worker: the floor, then per target kind the corpus loader, the store's JPEG and raw
        "100 px", "500 px", "100 px", "500 px"]  # the stage, then the decode alone
    assert all(len(SPREAD.findall(r)) == 3 for r in rows[:7]), out  # samples/s, MB/s, ms to an epoch's first batch
    assert all(len(SPREAD.findall(r)) == 3 for r in rows[7:9]), out
    # one request per block for kdcache's read; zarr's own reads at least one
    requests = rows[8].split("|")[5].split("/")
    assert float(requests[0]) == 1.0 and float(requests[1]) >= 1.0, rows[8]
    cells = [[c.strip() for c in r.split("|")[2:5]] for r in rows[9:16]]
    assert cells == [["32 px", "-", "decode floor (decode + view, no store)"],
                     *[["32 px", kind, side] for kind in ("fp16", "codes") for side in (
                         "corpus loader (each view cut from its image)", "the store's JPEG (quality 90) view pixels",
                         "the store's raw view pixels")]], cells
    assert all(len(SPREAD.findall(rows[i])) == (2 if i in (9, 10, 13) else 3) for i in range(9, 16)), out
    # every side's CPU per sample (this process and its loader's workers), and the corpus loader's against each store side's
    cpu = [[c.strip() for c in r.split("|")[7:9]] for r in rows[9:16]]
    assert all(float(c[0].replace(",", "")) > 0 for c in cpu), cpu
    assert [c[1] == "-" for c in cpu] == [True, True, False, False, True, False, False], cpu
    assert all(float(c[1]) > 0 for c in cpu if c[1] != "-"), cpu
    assert all(len(SPREAD.findall(r)) == 5 for r in rows[16:18]), out
    assert all(len(SPREAD.findall(r)) == 4 for r in rows[18:]), out
    mbs = {r.split("|")[1].strip(): float(r.split("|")[3].split()[0].replace(",", "")) for r in rows[:7]}
    # target bytes per sample: none, 4 x 192 fp16 patch tokens + the summary, 4 x 8 one-byte codes + the summary
    assert mbs["local, no target arrays (keys and views only)"] == 0 < mbs["local, patch codes, verification on"]
    assert SPREAD.search(out.split("local: verified / unverified throughput = ")[1])
    assert SPREAD.search(out.split("loader (local, verified) / decode floor = ")[1])
    assert SPREAD.search(out.split("local, patch codes, verification on / decode floor = ")[1])
    assert "64-px student input" in out and "1 stored view(s) per image, one read per block and epoch (store format 4)" in out
    d = json.loads(run_cli("bench", "load", "-t", vit_spec, "--images", "32", "--workers", "0", "--repeat", "1", "--s3", "off",
                           "--codes", "none", "--decode-sizes", "500", "--decode-images", "4", "--views", "2",
                           "--student-size", "40", "--pixel-sizes", "none", "--seconds", "0.05", "--json").stdout)
    # every side, the floor too, delivered the student's input size
    assert d["student_size"] == 40 and set(map(tuple, d["image_shapes"].values())) == {(3, 40, 40)}, d["image_shapes"]
    assert d["stored_views"] == 2 and d["store_format"] == 4  # two views per image, each its own Zarr shard; one per sample:
    m = d["measurement"]
    # each timed run: whole epochs of 32 samples (two batches), as many as last 0.05 s (counted per side in its
    # warm-up), each timed from its first batch: the 16 samples after it; the time to that first batch apart
    assert d["seconds"] == 0.05 and set(d["epochs_per_run"]) == set(m["items"])
    assert all(m["items"][name] == 16 * n for name, n in d["epochs_per_run"].items()), (m["items"], d["epochs_per_run"])
    assert all(0 < t["min"] <= t["median"] <= t["max"] for t in d["first_batch_ms"].values()), d["first_batch_ms"]
    assert "local, patch codes, verification on" not in m["items"] and d["bytes_per_sample"] == (4 * 192 + 192) * 2
    assert d["pixels"] == []
    [reads] = d["block_reads"]  # every fp16 block, by both reads: the same megabytes per pass
    assert reads["where"] == "local" and reads["requests_per_block"] is None and reads["blocks"] == 2 * 2  # 2 arrays x 2 views
    assert reads["megabytes"] == 32 * 2 * (4 * 192 + 192) * 2 / 1e6 and reads["kdcache_over_zarr"]["median"] > 0
    [row] = d["decode"]
    assert row["long_side"] == 500 and row["reduced_over_full"]["median"] > 0 and row["reduced_over_pil_full"]["median"] > 0
    assert row["pil_full"]["median"] > 0 and row["full"]["median"] > 0
    assert row["reduced_decode_over_pil_full_decode"]["median"] > 0 and row["reduced_decode"]["median"] > 0
    assert row["pil_full_decode"]["median"] > 0 and row["full_decode"]["median"] > 0


def test_bench_extract_quantize_prints_encode_over_teacher_tokens(vit_spec):
    # 64 images x 4 tokens: the 256 tokens a quantizer needs at least
    out = run_cli("bench", "extract", "-t", vit_spec, "--images", "64", "--batch-size", "16", "--workers", "0",
                  "--quantize", "rq:M=8,beam=4,niter=2", "--repeat", "2").stdout
    rows = _table_rows(out)
    assert len(rows) == 3 and "torch encoder rq:M=8,beam=4,niter=2" in rows[2] and "4 tokens/img" in rows[2], out
    assert SPREAD.match(out.split("encode tok/s / teacher tok/s ")[1])
    d = json.loads(run_cli("bench", "extract", "-t", vit_spec, "--images", "64", "--batch-size", "16", "--workers", "0",
                           "--quantize", "pq:M=8", "--repeat", "2", "--json").stdout)
    m = d["measurement"]
    enc, bare = "torch encoder on the teacher's patches", "bare teacher forward"
    assert m["items"][enc] == 64 * 4  # every patch token of the 64 images
    # the printed ratio is (encoded tokens/s) / (teacher images/s x tokens per image), round by round
    want = [(m["items"][enc] / a) / (m["items"][bare] / b) / 4 for a, b in zip(m["seconds"][enc], m["seconds"][bare])]
    assert abs(d["encode_over_teacher"]["median"] - statistics.median(want)) < 1e-9


def test_fidelity_curve_rows_and_refinement_continues_in_place():
    from kdcache.bench.quantizers import fidelity_curve
    from kdcache.quantize.encoder import TorchEncoder
    from kdcache.quantize.methods import fit, refine_codebooks
    from kdcache.quantize.quantizer_spec import QuantizerSpec
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((3000, 6)) @ rng.standard_normal((6, 32)) + 0.1 * rng.standard_normal((3000, 32))).astype(np.float32)
    train, held = x[:2600], x[2600:]
    # refine=2 then 1 more round == refine=3 at once (what lets the curve continue in place)
    a = fit(QuantizerSpec(method="rq", m=5, norm=1, beam=4, refine=3), train)
    b = refine_codebooks(fit(QuantizerSpec(method="rq", m=5, norm=1, beam=4, refine=2), train), train, rounds=1, beam=4)
    np.testing.assert_array_equal(a.codebooks, b.codebooks)
    assert b.attrs["spec"] == a.attrs["spec"] == "rq:M=5,beam=4,train_beam=1,refine=3,norm=1"
    d = json.loads(fidelity_curve(train, held, what="low rank", fractions=(16, 8), beams=(1, 4), refines=(0, 2),
                                  as_json=True, log=lambda r: None))
    rows = d["rows"]
    assert [(r["fraction"], r["beam"], r["refine"]) for r in rows] == [(f, bm, r) for f in (16, 8) for bm in (1, 4) for r in (0, 2)]
    assert [r["m"] for r in rows] == [4] * 4 + [8] * 4
    for r in rows:  # every point is the torch encoder's held-out fidelity of the codebooks at that point
        assert 0 < r["p5_cos"] <= r["mean_cos"] <= 1
    by = {(r["fraction"], r["beam"], r["refine"]): r for r in rows}
    assert by[(8, 4, 2)]["mean_cos"] > by[(16, 1, 0)]["mean_cos"]  # more bytes, wider beam, refined: better
    cb = fit(QuantizerSpec(method="rq", m=8, norm=1), train)
    want = TorchEncoder(cb, beam=4)(held).numpy()
    from kdcache.quantize.reconstruction import reconstruction_fidelity as fidelity
    assert abs(fidelity(held, cb.decode(want))["mean_cos"] - by[(8, 4, 0)]["mean_cos"]) < 1e-12


def test_bench_scale_counts_requests_with_and_without_the_shard_index(tmp_path):
    out = run_cli("bench", "scale", "--out", str(tmp_path / "scale"), "--shards", "3,9", "--repeat", "1", "--command", "info",
                  "--command", "store ls", "--no-progress", "--json").stdout
    d = json.loads(out)
    rows = {(r["where"], r["command"], r["index"], r["shards"]): r for r in d["rows"]}
    assert len(rows) == 2 * 2 * 2 * 2  # locations x commands x index on/off x shard counts
    for command in ("info", "store ls"):
        s3 = lambda index, n: rows[("s3 (loopback moto)", command, index, n)]["requests"]  # noqa: E731
        assert s3(True, 3) == s3(True, 9)  # with the index: the same few requests at 3 and 9 shards
        assert s3(False, 9) - s3(False, 3) >= 6  # without it: at least one more per shard
        assert rows[("local", command, True, 9)]["requests"] is None and rows[("local", command, True, 9)]["peak_mib"] > 10
    assert set(d["targets"]) == {"local: info", "local: store ls", "s3 (loopback moto): info", "s3 (loopback moto): store ls"}
    assert d["targets"]["s3 (loopback moto): info"]["extra_requests_per_1000_shards"] == 0
    # the stores are kept and reused
    assert sorted(os.listdir(tmp_path / "scale")) == ["corpus-3", "corpus-9", "store-3.zarr", "store-9.zarr"]
