"""``kdcache demo``: the main job on the embedded corpus with the real pretrained teacher."""
from __future__ import annotations

import re

from kdcache.demo import DemoOptions, run_demo


def test_demo_distils_the_real_teacher_and_reports_knn(tmp_path):
    out = run_demo(DemoOptions(out=str(tmp_path / "demo"), epochs=1, progress=False))
    rows = dict(re.findall(r"^\| (random-init student|distilled student \(from the cache\)|teacher, cached features) \| "
                           r"([\d.]+) \|", out, re.M))
    assert len(rows) == 3, out
    # ImageNet features separate digits and photos far better than a random network's
    assert float(rows["teacher, cached features"]) > float(rows["random-init student"]) + 0.05, out
    assert "tf_efficientnet_lite0  dim=1280 grid=7x7" in out and "256 (0 failed at extraction)" in out
    assert (tmp_path / "demo" / "teacher" / "tf_efficientnet_lite0.safetensors").exists()
