"""The prepared GPU check (bench/gpu_check.sh), rehearsed on the CPU: ``--dry-run`` runs every stage at tiny sizes.

The GPU machine is lent for minutes, with no time to debug there: what can break in the script itself
(arguments of the commands it calls, config keys, result parsing, the summary) breaks here first.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench import gpu_check  # noqa: E402

STAGES_RUN = ["pytest", "no_sync", "bench_ops", "train_step", "train_step_toco", "train_fp32", "train_bf16",
              "train_step_compiled"]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One dry run of every stage (install skipped), as CI runs it: about 7 min of CPU time on 2 cores (more wall
    time on a shared machine; the stage budgets allow for it)."""
    out = tmp_path_factory.mktemp("gpu_check")
    env = {k: v for k, v in os.environ.items() if k != "TSCD_BACKEND"}
    env["PYTHON"] = sys.executable  # the interpreter running the tests (`make test` does not put .venv on PATH)
    cmd = ["bash", str(ROOT / "bench" / "gpu_check.sh"), str(out), "--dry-run", "--total-budget", "1800"]
    proc = subprocess.run(cmd,
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1900)
    return out, proc


@pytest.mark.slow
def test_dry_run_every_stage_passes(dry_run):
    out, proc = dry_run
    summary = json.loads((out / "summary.json").read_text())
    status = {s["name"]: s["status"] for s in summary["stages"]}
    assert status.pop("install") == "skipped", "the dry run installs nothing"
    failed = {k: v for k, v in status.items() if v != "passed"}
    assert not failed, f"stages not passed: {failed}\n{proc.stdout[-3000:]}\n{(out / 'log.txt').read_text()[-6000:]}"
    assert list(status) == STAGES_RUN
    assert proc.returncode == 0
    assert summary["env"]["dry_run"] is True and summary["passed"] is True
    for stage in summary["stages"]:  # each stage says how long it took, within its budget
        assert stage["seconds"] <= stage["budget"] + 5
    assert all(f"stage {name}:" in proc.stdout for name in STAGES_RUN)


@pytest.mark.slow
def test_dry_run_results_are_few_small_files(dry_run):
    out, _ = dry_run
    files = [p for p in out.rglob("*") if p.is_file()]
    names = {str(p.relative_to(out)) for p in files}
    assert {"summary.json", "summary.md", "log.txt"} <= names
    assert not [n for n in names if n.endswith((".pt", ".pth", ".ckpt"))], "checkpoints must not land in OUT_DIR"
    assert len(files) <= 30 and sum(p.stat().st_size for p in files) < 2_000_000, sorted(names)
    summary = json.loads((out / "summary.json").read_text())
    stages = {s["name"]: s for s in summary["stages"]}
    # the figures each stage exists for were produced and parsed
    bench_jsons = [n for n in names if n.startswith("bench/") and n.endswith(".json")]
    assert {Path(n).stem for n in bench_jsons} >= {"refine", "correlation", "permutohedral"}
    rows = stages["train_step"]["detail"]["rows"]
    assert {"reference-style"} <= {r["path"] for r in rows} and all(r["s_per_it"] > 0 for r in rows)
    toco = stages["train_step_toco"]["detail"]["rows"]  # ToCo's rows, not TSCD's again
    assert {r["path"] for r in toco} >= {"reference-style", "default"} and all(r["s_per_it"] > 0 for r in toco)
    compiled = stages["train_step_compiled"]["detail"]["rows"]  # the whole iteration uncompiled and compiled
    assert [r["path"] for r in compiled] == ["default", "compiled-cams"]  # the GPU run adds `compiled` (all)
    assert all(r["s_per_it"] > 0 and r["first_it_s"] > 0 for r in compiled)
    assert stages["train_fp32"]["detail"]["validation"], "the validation mIoU lines were not parsed"
    assert stages["no_sync"]["detail"]["device"] == "cpu"
    assert stages["pytest"]["detail"]["counts"]["gpu"].get("skipped", 0) > 0  # gpu tests exist, skipped here
    md = (out / "summary.md").read_text()
    assert all(f"| {name} | passed |" in md for name in STAGES_RUN)


def _check(tmp_path, **kw) -> gpu_check.Check:
    args = argparse.Namespace(out=str(tmp_path), dry_run=True, install=False, stages=list(gpu_check.STAGES),
                              total_budget=kw.pop("total_budget", 100.0), budget=kw.pop("budget", None))
    return gpu_check.Check(args)


@pytest.mark.slow
def test_a_failing_stage_is_reported_and_the_next_one_runs(tmp_path):
    check = _check(tmp_path)

    def broken(budget):
        raise RuntimeError("boom")

    check.stage("pytest", broken)
    check.stage("no_sync", lambda b: gpu_check.StageResult("no_sync", "passed"))
    by_name = {r.name: r for r in check.results}
    assert by_name["pytest"].status == "failed" and "boom" in by_name["pytest"].note
    assert by_name["no_sync"].status == "passed"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["passed"] is False and [s["name"] for s in summary["stages"]] == ["pytest", "no_sync"]
    assert "| pytest | failed |" in (tmp_path / "summary.md").read_text()


@pytest.mark.slow
def test_a_stage_past_its_budget_times_out(tmp_path):
    check = _check(tmp_path, budget=["pytest=1.5"])
    check.stage("pytest", lambda b: check.from_rc("pytest", ["sleep"],
                                                  *check.run("sleep", [sys.executable, "-c", "import time; "
                                                                       "time.sleep(30)"], b)[:2]))
    (res,) = check.results
    assert res.status == "timeout" and res.seconds < 10 and res.budget == 1.5


@pytest.mark.slow
def test_the_total_budget_caps_every_stage(tmp_path):
    check = _check(tmp_path, total_budget=3.0)
    check.stage("pytest", lambda b: gpu_check.StageResult("pytest", "passed", note=f"budget {b}"))
    assert check.results[0].budget <= 3.0
    check.deadline = 0.0  # nothing left
    check.stage("no_sync", lambda b: gpu_check.StageResult("no_sync", "passed"))
    assert check.results[1].status == "skipped" and "no time left" in check.results[1].note


def test_bad_arguments_fail_clearly(tmp_path):
    with pytest.raises(SystemExit):
        gpu_check.main(["--out", str(tmp_path), "--dry-run", "--stages", "pytest,nonsense"])
    with pytest.raises(SystemExit, match="unknown stage"):
        _check(tmp_path, budget=["nonsense=3"])
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh")], capture_output=True, text=True)
    assert proc.returncode == 2 and "usage" in proc.stderr


def test_pytest_counts_parsing():
    out = "....\n=== 3 passed, 2 skipped, 1 failed, 4 deselected in 1.2s ===\n"
    assert gpu_check._pytest_counts(out) == {"passed": 3, "skipped": 2, "failed": 1, "deselected": 4}
    assert gpu_check._pytest_counts("no tests ran") == {}
