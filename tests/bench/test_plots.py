"""kdcache bench plot: the docs' figures drawn from a bench's JSON, and a wrong file in one line."""
from __future__ import annotations

import json

import pytest
from helpers import cli_call, one_error_line

PNG = b"\x89PNG\r\n\x1a\n"


def _spread(m):
    return {"median": m, "min": m * 0.9, "max": m * 1.1}


SAMPLES = {
    "load": {"pixels": [{"workers": w, "size": s, "targets": t, "side": side, "rate": _spread(r), "over_corpus": None,
                         "kib_per_sample": 1.0}
                        for w in (1, 2) for s in (64, 224)
                        for t, side, r in (("-", "decode floor", 1000), ("fp16", "corpus loader", 900), ("fp16", "store JPEG", 4000),
                                           ("codes", "corpus loader", 950), ("codes", "store raw", 6000))]},
    "scale": {"rows": [{"where": w, "shards": n, "command": c, "index": True, "seconds": _spread(0.4 + n / 1e4),
                        "requests": None, "peak_mib": 100.0}
                       for w in ("local", "s3") for n in (10, 1000, 10000) for c in ("info", "train to step 1")]},
    "quantize": {"features": "effnet patch", "rows": [{"method": m, "m": b, "mean_cos": 0.9 + b / 1000, "relmse": 0.1}
                                                       for m in ("pq", "opq") for b in (20, 40, 80)]},
}


@pytest.mark.parametrize("kind", list(SAMPLES))
def test_each_figure_is_drawn_from_its_benchs_json(tmp_path, monkeypatch, capsys, kind):
    src = tmp_path / f"{kind}.json"
    src.write_text(json.dumps(SAMPLES[kind]))
    out = tmp_path / f"{kind}.png"
    code, printed, err = cli_call(monkeypatch, capsys, "bench", "plot", kind, str(src), "--out", str(out))
    assert code == 0 and printed.strip() == str(out), err
    assert out.read_bytes()[:8] == PNG and out.stat().st_size > 5000


def test_a_json_of_another_bench_is_one_line(tmp_path, monkeypatch, capsys):
    src = tmp_path / "scale.json"
    src.write_text(json.dumps(SAMPLES["scale"]))
    code, _, err = cli_call(monkeypatch, capsys, "bench", "plot", "load", str(src), "--out", str(tmp_path / "x.png"))
    assert code == 2 and "not the JSON of `kdcache bench load --json`" in one_error_line(err)
    (tmp_path / "bad.json").write_text("{nope")
    code, _, err = cli_call(monkeypatch, capsys, "bench", "plot", "scale", str(tmp_path / "bad.json"), "--out",
                            str(tmp_path / "y.png"))
    assert code == 2 and "not a bench's JSON output" in one_error_line(err)
