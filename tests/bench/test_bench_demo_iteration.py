"""bench/bench_demo_iteration.py: the demo's iteration under config variants, interleaved, with the projected
training time of the demo's schedule."""
import argparse
import json

import pytest

from bench import bench_demo_iteration


def test_variants_are_timed_interleaved_and_projected(tmp_path):
    rc = bench_demo_iteration.main(["--variant", "demo=train.seed=0", "--variant", "small batch=data.batch_size=2",
                                    "--rounds", "3", "--warm", "0", "--no-skip-first-epoch", "--threads", "1",
                                    "--budget", "1e6", "--out", str(tmp_path)])
    assert rc == 0
    [path] = list(tmp_path.glob("*/demo_iteration.json"))
    data = json.loads(path.read_text())
    rows = {r["variant"]: r for r in data["rows"]}
    assert list(rows) == ["demo", "small batch", bench_demo_iteration.CLS_ONLY]
    assert rows["demo"]["vs_demo"] == 1.0 and rows["demo"]["range"] == "1.00-1.00"
    cls_only = rows[bench_demo_iteration.CLS_ONLY]
    assert cls_only["projected_s"] == "-" and 0 < cls_only["s_per_it"]
    # the demo's schedule: 700 classification-only iterations, then 1100 full ones
    for name in ("demo", "small batch"):
        r = rows[name]
        assert r["projected_s"] == pytest.approx(700 * cls_only["s_per_it"] + 1100 * r["s_per_it"], rel=1e-3, abs=0.2)
        assert r["within_budget"] == "yes"
    # a full iteration does more than a classification-only one (the CAM passes, labels, losses, view 2)
    assert rows["demo"]["s_per_it"] > cls_only["s_per_it"]
    md = path.with_suffix(".md").read_text()
    assert "data.batch_size=2" in md and "projected training s" in md


@pytest.mark.parametrize("text", ["demo", "=train.seed=1", "demo=seed"])
def test_a_bad_variant_is_named(text):
    with pytest.raises(argparse.ArgumentTypeError, match="--variant"):
        bench_demo_iteration.parse_variant(text)


def test_a_variant_with_several_overrides():
    assert bench_demo_iteration.parse_variant("fast = pseudo.cam_scales=[1.0, 0.5], loss.scd=0") == (
        "fast", ["pseudo.cam_scales=[1.0, 0.5]", "loss.scd=0"])


def test_variant_names_must_differ():
    with pytest.raises(SystemExit):
        bench_demo_iteration.main(["--variant", "a=train.seed=0", "--variant", "a=train.seed=1"])
