"""bench/_common.write_results + bench/report.py: files, tables, plots and the README section."""
import importlib.util
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name.split('.')[-1]}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_write_results_and_report(tmp_path):
    common = _load("bench._common")
    report = _load("bench.report")
    env = common.environment(torch.device("cpu"), 2)
    rows = [{"size": "16x16", "K": 2, "B": 1, "mode": "fwd", "backend": b, "ms": ms, "peak_mib": mem,
             "speedup": 10.0 / ms, "mem_ratio": 8.0 / mem} for b, ms, mem in (("torch", 10.0, 8.0), ("cpp", 2.0, 1.0))]
    cols = [("size", "H x W"), ("backend", "backend"), ("ms", "ms"), ("speedup", "speed-up")]
    js, md = common.write_results("refine", env, rows, cols, tmp_path)
    assert js.parent.name == "cpu-2t" and js.name == "refine.json" and "| 16x16 | cpp | 2 | 5 |" in md.read_text()
    readme = tmp_path / "top_README.md"
    readme.write_text("intro\n<!-- bench:begin -->\nold\n<!-- bench:end -->\noutro\n")
    assert report.main(["--results", str(tmp_path), "--readme", str(readme)]) == 0
    page = (tmp_path / "README.md").read_text()
    assert "## refine" in page and "Roofline" in page and "GB/s" in page
    assert (tmp_path / "cpu-2t" / "refine.png").stat().st_size > 1000
    text = readme.read_text()
    assert "old" not in text and "| refine |" in text and "5x" in text and text.endswith("outro\n")


def test_bench_cli_rejects_unknown_op(capsys):
    import pytest

    from tscd.cli import main

    with pytest.raises(SystemExit, match="unknown op"):
        main(["bench", "nonsense", "--no-report"])
