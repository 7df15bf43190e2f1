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
    # CPU roofline notes: the kernel's traffic rate against the machine's own measured copy bandwidth
    assert env["peak_copy_gbs"] > 0 and env["peak_copy_gbs_1t"] > 0
    assert "% of this CPU's" in page and "GB/s copy bandwidth" in page
    assert (tmp_path / "cpu-2t" / "refine.png").stat().st_size > 1000
    text = readme.read_text()
    assert "old" not in text and "| refine |" in text and "5x" in text and text.endswith("outro\n")


def test_bench_cli_rejects_unknown_op(capsys):
    from tscd.cli import main

    assert main(["bench", "nonsense", "--no-report"]) == 2  # a user error: one line, exit 2
    assert "unknown op" in capsys.readouterr().err


def test_report_renders_the_training_memory_table(tmp_path):
    common = _load("bench._common")
    report = _load("bench.report")
    env = common.environment(torch.device("cpu"), 2)
    rows = [{"path": p, "model": "tscd_mit_b1", "crop": 512, "batch": 4, "amp": amp, "checkpointing": ck,
             "micro_batch": mb, "s_per_it": s, "peak_mib": mem, "mem_ratio": mem / 2000.0, "speedup": 60.0 / s}
            for p, amp, ck, mb, s, mem in (("reference-style", "off", "off", 4, 60.0, 2000.0),
                                           ("default", "off", "off", 4, 30.0, 1000.0),
                                           ("low-memory", "bf16", "all", 1, 90.0, 400.0))]
    common.write_results("train_step-tscd_mit_b1-512-b4", env, rows, [("path", "path")], tmp_path)
    readme = tmp_path / "top_README.md"
    readme.write_text("<!-- bench:begin -->\n<!-- bench:end -->\n")
    assert report.main(["--results", str(tmp_path), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "| default path | 30 s | 2x | 2x |" in text  # the ops table: default vs reference-style
    assert "| low-memory | bf16 | all | 1 | 400 | 0.2x reference-style | 90 |" in text
    assert "| reference-style | off | off | 4 | 2000 | 1x reference-style | 60 |" in text
