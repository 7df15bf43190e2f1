"""bench/demo_ablation.py: the rows it runs and the table it writes (the training itself is tested elsewhere)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _module():
    spec = importlib.util.spec_from_file_location("demo_ablation", ROOT / "bench" / "demo_ablation.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_rows_switch_on_one_component_at_a_time():
    mod = _module()
    rows = {name: set(extra) for name, _, extra in mod.ROWS}
    assert rows["tscd"] == set()
    assert rows["scd"] == {"loss.reg=0"}
    assert rows["varm"] == {"loss.reg=0", "loss.scd=0"}
    assert rows["afa"] == rows["varm"] | {"pseudo.refine_mode=par"}
    assert {"loss.seg=0", "loss.aff=0", "loss.reg=0", "loss.scd=0"} == rows["cam"]
    assert mod.ROWS[0][0] == "tscd"  # runs first: its checkpoint is the shared warm-up


def test_markdown_table_in_paper_order_with_device_and_times():
    mod = _module()
    rows = [{"row": n, "seg_miou": 50.0 + i, "cam_miou": 40.0, "pseudo_miou": 60.0, "wall_s": 10.0 * i,
             "load_start": "load average 1.0 2.0 3.0"} for i, n in enumerate(["tscd", "cam", "afa", "varm", "scd"])]
    md = mod.markdown({"max_iters": 360, "cam_iters": 300, "val_num": 50, "seed": 0, "device": "CPU (x, 2 cores)",
                       "note": "shortened", "rows": rows})
    lines = md.splitlines()
    assert "360 iterations (300 cls-only warm-up, shared)" in lines[0] and "CPU (x, 2 cores)" in lines[0]
    body = [ln for ln in lines if ln.startswith("| ") and "variant" not in ln]
    assert [b.split(" | ")[0] for b in body] == ["| cls only (CAM)", "| + seg/aff on PAR pseudo labels (AFA-style)",
                                                  "| + VARM instead of PAR", "| + SCD", "| full TSCD (+ CRF loss)"]
    assert "(not trained)" in body[0] and "| 50.0 |" in body[-1]


def test_bad_iteration_arguments_fail_clearly(capsys):
    with pytest.raises(SystemExit):
        _module().main(["--max-iters", "100", "--cam-iters", "100"])
    assert "need 0 < --cam-iters < --max-iters" in capsys.readouterr().err
