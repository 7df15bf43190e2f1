"""bench/bench_train_step.py --profile: the per-phase table of a real iteration (tiny model, CPU)."""
import json

import pytest

from bench import bench_train_step


@pytest.mark.slow
def test_profile_writes_every_phase(tmp_path):
    rc = bench_train_step.main(["--device", "cpu", "--crop", "64", "--batch", "2", "--model", "tscd_mit_tiny",
                                "--timed", "1", "--rows", "reference-style,default", "--profile", "--threads", "1",
                                "--out", str(tmp_path)])
    assert rc == 0
    [phases] = list(tmp_path.glob("*/train_step-tscd_mit_tiny-64-b2-phases.json"))
    data = json.loads(phases.read_text())
    assert "rows" not in data  # bench/report.py renders the main file's rows only
    default = data["profiles"]["default"]
    ranges = default["ranges"]
    for key in ("tscd/terms", "tscd/cam_passes", "tscd/cam_pass/scale=0.5", "tscd/cam_pass/scale=1",
                "tscd/cam_pass/scale=1.5", "tscd/cam_pass/decoder_stats", "tscd/pseudo_label", "tscd/forward/view1",
                "tscd/forward/view2", "tscd/crf_loss", "tscd/scd_loss", "tscd/backward", "tscd/optimizer"):
        assert ranges.get(key, 0) > 0, key
    # the ranges nest: the scales inside the CAM passes, those inside the forward work, all inside the iteration
    scales = sum(v for k, v in ranges.items() if k.startswith("tscd/cam_pass/scale="))
    assert scales <= ranges["tscd/cam_passes"] * 1.01 <= ranges["tscd/terms"] * 1.01
    assert ranges["tscd/terms"] + ranges["tscd/backward"] + ranges["tscd/optimizer"] <= default["total_s"] * 1.01
    assert "tscd/cam_pass/decoder_stats" not in data["profiles"]["reference-style"]["ranges"]  # full passes
    assert default["cam_ops"] and default["data_s_per_batch"] > 0
    assert all(r["gflop"] > 0 for r in data["iterations"])
    md = phases.with_suffix(".md").read_text()
    assert "CAM passes, both views" in md and "scale 1.5" in md and "of the matmul peak" in md


def test_interleaved_rounds_give_medians_and_per_round_speedups(tmp_path, caplog):
    import logging

    caplog.set_level(logging.INFO)
    rc = bench_train_step.main(["--device", "cpu", "--crop", "48", "--batch", "2", "--model", "tscd_mit_tiny",
                                "--timed", "1", "--rows", "reference-style,default", "--rounds", "3",
                                "--threads", "1", "--out", str(tmp_path)])
    assert rc == 0
    [main] = list(tmp_path.glob("*/train_step-tscd_mit_tiny-48-b2.json"))
    rows = {r["path"]: r for r in json.loads(main.read_text())["rows"]}
    order = [m.split()[2] for m in caplog.messages if m.startswith("round ")]
    assert order == ["reference-style", "default", "default", "reference-style", "reference-style", "default"]
    for r in rows.values():
        assert len(r["round_times"]) == 3 and r["s_per_it"] == sorted(r["round_times"])[1]
    ref, dflt = rows["reference-style"], rows["default"]
    ratios = [a / b for a, b in zip(ref["round_times"], dflt["round_times"])]
    assert dflt["speedup"] == pytest.approx(sorted(ratios)[1]) and ref["speedup"] == 1
    assert dflt["speedup_range"] == f"{min(ratios):.2f}-{max(ratios):.2f}"
    md = main.with_suffix(".md").read_text()
    assert "median of rounds" in md and "per-round range" in md and "row by row" in md
