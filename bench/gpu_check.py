"""One prepared check that takes a bare GPU machine to a full set of GPU test results and figures.

    bench/gpu_check.sh OUT_DIR                 # on the GPU machine (installs tscd, then every stage)
    bench/gpu_check.sh OUT_DIR --dry-run       # the same stages on the CPU at tiny sizes (CI runs this)
    python bench/gpu_check.py --out OUT_DIR --stages pytest,no_sync   # a subset

Stages, in order, each a subprocess with its own time budget (seconds, capped by what is left of
``--total-budget``); a stage that fails or runs out of time is reported and the next one still runs:

    install     pip install --no-build-isolation --no-deps -e . into the machine's own Python (its torch is
                left alone), CUDA kernels for the local GPU's architecture only (TORCH_CUDA_ARCH_LIST from
                torch.cuda.get_device_capability); falls back to an in-place build. Skipped by --dry-run.
    pytest      pytest -m gpu (CUDA parity of every backend incl. bf16/fp16, no-host-sync tests), then the
                CUDA cases of the parametrised kernel tests
    no_sync     one whole training step under torch.cuda.set_sync_debug_mode: every host sync is recorded with
                the tscd line that caused it; the step passes when the only ones are the step's result
                (the float() of the returned losses)
    bench_ops   tscd bench refine correlation permutohedral --device cuda at the default (SPEC) sizes
    train_step  bench/bench_train_step.py at crop 512, global batch 4: reference-style, default and low-memory
                rows, s/iteration and peak memory, with --profile (the per-phase table of each row, the CAM
                passes' operator list, FLOPs)
    train_step_toco
                the same for ``recipe: toco`` (ViT-B/16, crop 448, global batch 4): reference-style (ToCo's
                official passes), default and low-memory rows, with --profile
    train_fp32, train_bf16
                a short real `tscd train` on the demo config (a few hundred iterations, then validation)
    train_step_compiled
                the whole iteration uncompiled and compiled: default, compiled-cams (train.compile: cams) and
                compiled (all) rows at crop 512, global batch 4, --timed 3 (the first iteration compiles and is
                reported apart); last, as inductor's compilation may take what is left (each row is written as
                it finishes); the dry run: default and compiled-cams

Everything goes under OUT_DIR: summary.json, summary.md, log.txt (each stage's command, time and output tail),
bench/<device>/*.{json,md} and pytest-*.xml. Run directories (checkpoints) go to a temporary folder, not OUT_DIR.
Exit status: 0 when every stage passed, 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: stage -> budget in seconds on a GPU (H100/H200, 16 cores); caps, not estimates: the total is capped at
#: 450 s (--total-budget), and a stage gets at most what is left of it
GPU_BUDGETS = {"install": 120, "pytest": 120, "no_sync": 40, "bench_ops": 60, "train_step": 120,
               "train_step_toco": 90, "train_fp32": 40, "train_bf16": 30, "train_step_compiled": 240}
#: the dry run on a CPU (2 cores, possibly shared with other jobs): tiny sizes, but imports and model builds
#: dominate; about 1 min of CPU per stage, the budgets leave room for a loaded machine
DRY_BUDGETS = {"install": 600, "pytest": 300, "no_sync": 300, "bench_ops": 300, "train_step": 300,
               "train_step_toco": 300, "train_fp32": 300, "train_bf16": 300, "train_step_compiled": 300}
STAGES = tuple(GPU_BUDGETS)
TAIL_CHARS = 4000  # of each stage's output kept in log.txt


@dataclass
class StageResult:
    name: str
    status: str  # passed | failed | timeout | skipped
    seconds: float = 0.0
    budget: float = 0.0
    command: str = ""
    detail: dict = field(default_factory=dict)
    note: str = ""


class Check:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out = Path(args.out).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.dry = args.dry_run
        self.python = sys.executable
        self.device = "cpu" if self.dry else "cuda"
        self.budgets = dict(DRY_BUDGETS if self.dry else GPU_BUDGETS)
        for item in args.budget or []:
            name, _, sec = item.partition("=")
            if name not in self.budgets:
                raise SystemExit(f"gpu_check: --budget {item!r}: unknown stage {name!r}; stages: {', '.join(STAGES)}")
            self.budgets[name] = float(sec)
        self.deadline = time.monotonic() + args.total_budget
        self.tmp = Path(tempfile.mkdtemp(prefix="tscd_gpu_check_"))
        self.log = open(self.out / "log.txt", "a")
        self.results: list[StageResult] = []
        self._machine_info: dict | None = None
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = str(ROOT) + (os.pathsep + self.env["PYTHONPATH"] if self.env.get("PYTHONPATH") else "")
        self.env.pop("TSCD_BACKEND", None)
        if self.dry:
            self.env["TRITON_INTERPRET"] = "1"
            self.env.setdefault("OMP_NUM_THREADS", "2")
        else:
            self.env.pop("TRITON_INTERPRET", None)

    # ---------------------------------------------------------------------------------------- helpers
    def say(self, msg: str) -> None:
        line = f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        self.log.write(line + "\n")
        self.log.flush()

    def run(self, name: str, cmd: list[str], budget: float, env: dict | None = None) -> tuple[int | None, str, float]:
        """Run ``cmd`` with a timeout; (return code or None on timeout, output, seconds)."""
        self.log.write(f"\n===== {name}: {' '.join(cmd)}\n")
        self.log.flush()
        t0 = time.monotonic()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env or self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, timeout=max(1.0, budget), errors="replace")
            rc, out = proc.returncode, proc.stdout
        except subprocess.TimeoutExpired as exc:
            rc = None
            out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        dt = time.monotonic() - t0
        self.log.write(out[-TAIL_CHARS:] + f"\n===== {name}: rc={rc} in {dt:.1f} s\n")
        self.log.flush()
        return rc, out, dt

    def stage(self, name: str, fn) -> None:
        if name not in self.args.stages:
            return
        left = self.deadline - time.monotonic()
        budget = min(self.budgets[name], left)
        if left < 5:
            res = StageResult(name, "skipped", budget=budget, note="no time left in --total-budget")
        else:
            t0 = time.monotonic()
            try:
                res = fn(budget)
            except Exception as exc:  # a bug in a stage must not stop the others
                res = StageResult(name, "failed", note=f"{type(exc).__name__}: {exc}")
            res.name, res.budget = name, round(budget, 1)
            res.seconds = round(time.monotonic() - t0, 1)
        self.results.append(res)
        self.say(f"stage {name}: {res.status.upper()} in {res.seconds:.1f} s (budget {res.budget:.0f} s)"
                 + (f" - {res.note}" if res.note else ""))
        self.write_summary()

    def from_rc(self, name: str, cmd: list[str], rc: int | None, out: str, **detail) -> StageResult:
        status = "timeout" if rc is None else ("passed" if rc == 0 else "failed")
        note = "" if rc == 0 else ("ran past its budget" if rc is None else f"exit status {rc}")
        if rc not in (0, None):
            lines = [ln for ln in out.strip().splitlines() if ln.strip()]
            note += f"; last line: {lines[-1][:300]}" if lines else ""
        return StageResult(name, status, command=" ".join(cmd), detail=detail, note=note)

    # ---------------------------------------------------------------------------------------- stages
    def install(self, budget: float) -> StageResult:
        if self.dry and not self.args.install:
            return StageResult("install", "skipped", note="--dry-run installs nothing (tested: the other stages)")
        env = dict(self.env)
        probe = subprocess.run([self.python, "-c", "import torch; print(torch.__version__, torch.version.cuda, "
                                "'%d.%d' % torch.cuda.get_device_capability() if torch.cuda.is_available() else '')"],
                               capture_output=True, text=True, env=env)
        fields = probe.stdout.split()
        arch = fields[2] if len(fields) > 2 else ""
        env["TSCD_BUILD_CUDA"] = "0" if self.dry else "1"
        env["TSCD_BUILD_STRICT"] = "1"
        env["MAX_JOBS"] = str(os.cpu_count() or 4)
        if arch:
            env["TORCH_CUDA_ARCH_LIST"] = arch
        cmd = [self.python, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index", "-e", str(ROOT)]
        rc, out, dt = self.run("install", cmd, budget, env)
        how = "pip editable"
        if rc not in (0, None):
            # e.g. no write access to site-packages, an old pip, or the CUDA build failed: build in place (the
            # stages import tscd from ROOT anyway), CUDA if it builds, else the CPU kernels (the GPU tests'
            # references), and report the stage as failed below when the CUDA kernels are missing
            env.update(TSCD_BUILD_CUDA="auto", TSCD_BUILD_STRICT="0")
            cmd = [self.python, "setup.py", "build_ext", "--inplace"]
            rc, out, _ = self.run("install (fallback)", cmd, budget - dt, env)
            how = "setup.py build_ext --inplace (after the pip install failed)"
        res = self.from_rc("install", cmd, rc, out, torch=" ".join(fields[:2]), arch=arch, how=how)
        if rc == 0:
            info = subprocess.run([self.python, "-m", "tscd", "info"], capture_output=True, text=True, env=self.env,
                                  cwd=ROOT, timeout=60)
            self.log.write(info.stdout[-TAIL_CHARS:] + info.stderr[-TAIL_CHARS:])
            built = subprocess.run([self.python, "-c", "from tscd.kernels import _ext; print(_ext.has_cpp(), "
                                    "_ext.has_cuda_kernels())"], capture_output=True, text=True, env=self.env, cwd=ROOT)
            res.detail["extension"] = built.stdout.strip()
            if not self.dry and "True True" not in built.stdout:
                res.status, res.note = "failed", f"tscd._C without CUDA kernels after the build: {built.stdout.strip()}"
        return res

    def pytest(self, budget: float) -> StageResult:
        t0 = time.monotonic()
        xml1 = self.out / "pytest-gpu.xml"
        cmd1 = [self.python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "tests",
                f"--junitxml={xml1}", "-o", "junit_logging=no"]
        rc1, out1, _ = self.run("pytest -m gpu", cmd1, budget * 0.7)
        left = budget - (time.monotonic() - t0)
        xml2 = self.out / "pytest-cuda-params.xml"
        cmd2 = [self.python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/kernels", "-m", "not gpu", "-k",
                "cuda", f"--junitxml={xml2}", "-o", "junit_logging=no"]
        rc2, out2, _ = self.run("pytest cuda params", cmd2, left)
        counts = {"gpu": _pytest_counts(out1), "cuda_params": _pytest_counts(out2)}
        failed = [ln.strip() for ln in (out1 + out2).splitlines() if ln.startswith(("FAILED", "ERROR"))][:30]
        ok = lambda rc: rc in (0, 5)  # noqa: E731  (5: nothing collected)
        rc = None if None in (rc1, rc2) else (0 if ok(rc1) and ok(rc2) else 1)
        res = self.from_rc("pytest", cmd1, rc, out1 + out2, counts=counts, failed=failed)
        res.command = " ".join(cmd1) + " ; " + " ".join(cmd2)
        if self.dry and counts["gpu"].get("passed", 0):
            res.status, res.note = "failed", "gpu-marked tests ran on a machine without a GPU"
        return res

    def no_sync(self, budget: float) -> StageResult:
        report = self.tmp / "no_sync.json"
        cmd = [self.python, str(Path(__file__)), "--no-sync-worker", str(report), "--out", str(self.out)]
        cmd += ["--dry-run"] if self.dry else []
        rc, out, _ = self.run("no_sync", cmd, budget)
        detail = json.loads(report.read_text()) if report.is_file() else {}
        res = self.from_rc("no_sync", cmd, rc, out, **detail)
        if rc == 0 and detail.get("unexpected"):
            res.status = "failed"
            res.note = f"{len(detail['unexpected'])} host sync(s) inside the step, first at {detail['unexpected'][0]}"
        return res

    def bench_ops(self, budget: float) -> StageResult:
        out_dir = self.out / "bench"
        t0 = time.monotonic()
        per_op = {}
        ops = ["refine", "correlation", "permutohedral"]
        status = "passed"
        for op in ops:
            left = budget - (time.monotonic() - t0)  # in order: a slow op leaves less to the next ones
            cmd = [self.python, "-m", "tscd", "bench", op, "--device", self.device, "--no-report"]
            extra = ["--out", str(out_dir)]
            if self.dry:
                cmd += ["--sizes", {"refine": "24", "correlation": "8", "permutohedral": "16"}[op], "--threads", "2"]
                # the CPU backends only: the Triton interpreter would take minutes; the GPU run times every backend
                extra += {"refine": ["--channels", "2", "--batch", "1", "--min-run-time", "0.01", "--backends",
                                     "torch,cpp", "--modes", "fwd"],
                          "correlation": ["--modes", "fwd", "--min-run-time", "0.01", "--backends", "torch,cpp"],
                          "permutohedral": ["--classes", "2", "--batch", "1", "--min-run-time", "0.01"]}[op]
            elif op == "correlation":  # fwd_grad is fwd on the GPU backends (only cpp fuses the gradients)
                extra += ["--backends", "torch,cuda,triton", "--modes", "fwd,fwd_bwd"]
            cmd += ["--"] + extra
            rc, out, dt = self.run(f"bench {op}", cmd, left)
            per_op[op] = {"rc": rc, "seconds": round(dt, 1)}
            if rc != 0:
                status = "timeout" if rc is None and status == "passed" else "failed"
        res = StageResult("bench_ops", status, command=f"tscd bench <op> --device {self.device} -- --out {out_dir}",
                          detail={"ops": per_op, "files": _rel_files(out_dir, self.out)})
        if status != "passed":
            res.note = "failed or timed out: " + ", ".join(op for op, d in per_op.items() if d["rc"] != 0)
        return res

    def train_step(self, budget: float, recipe: str = "tscd") -> StageResult:
        out_dir = self.out / "bench"
        name = "train_step" if recipe == "tscd" else f"train_step_{recipe}"
        if recipe == "compiled":
            out_dir = self.out / "bench-compiled"  # its own folder: the same result file name as train_step's
            # the dry run leaves out `compiled` (all): inductor's forward + backward take minutes on a 2-core CPU
            args = (["--device", "cpu", "--crop", "64", "--batch", "2", "--model", "tscd_mit_tiny", "--timed", "1",
                     "--set", "pseudo.cam_scales=[1.0]", "--rows", "default,compiled-cams"] if self.dry else
                    ["--device", "cuda", "--crop", "512", "--batch", "4", "--model", "tscd_mit_b1", "--timed", "3",
                     "--rows", "default,compiled-cams,compiled"])
        elif recipe == "toco":
            args = (["--device", "cpu", "--crop", "64", "--batch", "2", "--model", "toco_vit_tiny", "--timed", "1",
                     "--set", "toco.local_crop_size=16", "--set", "toco.aux_layer=-2"] if self.dry else
                    ["--device", "cuda", "--crop", "448", "--batch", "4", "--timed", "2",
                     "--rows", "reference-style,default,low-memory", "--profile"])
            args += ["--recipe", "toco"]
        elif self.dry:
            args = ["--device", "cpu", "--crop", "64", "--batch", "2", "--model", "tscd_mit_tiny", "--timed", "1"]
        else:
            args = ["--device", "cuda", "--crop", "512", "--batch", "4", "--model", "tscd_mit_b1", "--timed", "3",
                    "--rows", "reference-style,default,compiled,low-memory", "--profile"]
        cmd = [self.python, "bench/bench_train_step.py", *args, "--out", str(out_dir)]
        rc, out, _ = self.run(name, cmd, budget)
        rows = []
        model = "toco_vit" if recipe == "toco" else "tscd_mit"
        for path in sorted(out_dir.glob(f"*/train_step-{model}*.json")):
            if path.name.endswith("-phases.json"):
                continue
            keys = ("path", "crop", "batch", "amp", "s_per_it", "peak_mib", "speedup", "mem_ratio", "first_it_s")
            rows += [{k: r.get(k) for k in keys} for r in json.loads(path.read_text()).get("rows", [])]
        return self.from_rc(name, cmd, rc, out, rows=rows)

    def train(self, amp: str, budget: float) -> StageResult:
        run_dir = self.tmp / f"train-{amp}"
        over = [f"train.run_dir={run_dir}", f"train.device={self.device}", f"train.amp={amp}",
                "train.tensorboard=false", "train.val_iters=0"]
        if self.dry:
            over += ["train.max_iters=2", "train.cam_iters=1", "train.log_iters=1", "train.ckpt_iters=1000",
                     "data.demo_num_train=4", "data.demo_num_val=2", "data.batch_size=2", "data.crop_size=32",
                     "data.demo_size=32", "optim.warmup_iters=1"]
        else:
            over += ["train.max_iters=300", "train.cam_iters=100", "train.log_iters=50", "train.ckpt_iters=100000",
                     "data.demo_num_val=50"]
        cmd = [self.python, "-m", "tscd", "train", "--config", "configs/demo.yaml", "--resume", "never", *over]
        rc, out, dt = self.run(f"train {amp}", cmd, budget)
        metrics = run_dir / "metrics.jsonl"  # the run's validation results, as data (tscd.eval.metrics)
        lines = metrics.read_text().splitlines() if metrics.is_file() else []
        miou = json.loads(lines[-1])["miou"] if lines else {}
        iters = [int(m.group(1)) for m in re.finditer(r"\bit(?:er(?:ation)?)?\s*[=:]?\s*(\d+)\s*/\s*\d+", out)]
        speed = re.findall(r"([\d.]+) s/it", out)
        detail = {"amp": amp, "validation": miou, "last_logged_iteration": max(iters) if iters else None,
                  "s_per_it_last_log": float(speed[-1]) if speed else None}
        shutil.rmtree(run_dir, ignore_errors=True)
        return self.from_rc(f"train_{amp}", cmd, rc, out, **detail)

    # ---------------------------------------------------------------------------------------- report
    def _machine(self) -> dict:
        """torch, CUDA and device names (probed once, in a subprocess: this process does not import torch)."""
        if self._machine_info is None:
            self._machine_info = {}
            try:
                probe = subprocess.run([self.python, "-c", "import torch, json; print(json.dumps({'torch': "
                                        "torch.__version__, 'cuda': torch.version.cuda, 'device': "
                                        "torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}))"],
                                       capture_output=True, text=True, timeout=120, env=self.env)
                self._machine_info = json.loads(probe.stdout.strip().splitlines()[-1])
            except Exception:
                pass
        return self._machine_info

    def write_summary(self) -> None:
        env = {"dry_run": self.dry, "python": sys.version.split()[0], "root": str(ROOT),
               "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), **self._machine()}
        data = {"env": env, "stages": [asdict(r) for r in self.results],
                "passed": all(r.status in ("passed", "skipped") for r in self.results)}
        (self.out / "summary.json").write_text(json.dumps(data, indent=1) + "\n")
        lines = [f"# tscd GPU check{' (dry run on the CPU)' if self.dry else ''}", "",
                 f"{env.get('device', '?')}, torch {env.get('torch', '?')}, CUDA {env.get('cuda', '?')}, "
                 f"{env['date']}", "", "| stage | status | seconds | budget | note |", "|---|---|---|---|---|"]
        for r in self.results:
            lines.append(f"| {r.name} | {r.status} | {r.seconds:.1f} | {r.budget:.0f} | {r.note.replace('|', '/')} |")
        for r in self.results:
            if r.name == "pytest" and r.detail.get("counts"):
                lines += ["", f"pytest: {r.detail['counts']}"] + [f"- {f}" for f in r.detail.get("failed", [])]
            if r.name.startswith("train_step") and r.detail.get("rows"):
                lines += ["", f"| {r.name.replace('_', ' ')} | crop | amp | s / it | peak MiB | 1st it. s |",
                          "|---|---|---|---|---|---|"]
                for row in r.detail["rows"]:
                    lines.append(f"| {row['path']} | {row['crop']} | {row['amp']} | {_fmt(row['s_per_it'])} | "
                                 f"{_fmt(row['peak_mib'])} | {_fmt(row.get('first_it_s'))} |")
            if r.name == "no_sync" and r.detail:
                lines += ["", f"no-sync step: {len(r.detail.get('unexpected', []))} unexpected host sync(s), "
                          f"{len(r.detail.get('expected', []))} expected (the returned losses)"]
                lines += [f"- {s}" for s in r.detail.get("unexpected", [])[:10]]
            if r.name in ("train_fp32", "train_bf16") and "amp" in r.detail:
                d = r.detail
                lines += ["", f"{r.name}: reached iteration {d.get('last_logged_iteration')}, "
                          f"{_fmt(d.get('s_per_it_last_log'))} s/it at the last log line; validation mIoU: "
                          + (", ".join(f"{k} {v:.2f}" for k, v in d["validation"].items() if v is not None) or "none")]
        (self.out / "summary.md").write_text("\n".join(lines) + "\n")

    def main(self) -> int:
        self.say(f"{'dry run (CPU, tiny sizes)' if self.dry else 'GPU check'} of {ROOT} into {self.out}; "
                 f"stages {','.join(s for s in STAGES if s in self.args.stages)}; total budget "
                 f"{self.args.total_budget:.0f} s")
        self.stage("install", self.install)
        self.stage("pytest", self.pytest)
        self.stage("no_sync", self.no_sync)
        self.stage("bench_ops", self.bench_ops)
        self.stage("train_step", self.train_step)
        self.stage("train_step_toco", lambda b: self.train_step(b, "toco"))
        self.stage("train_fp32", lambda b: self.train("off", b))
        self.stage("train_bf16", lambda b: self.train("bf16", b))
        self.stage("train_step_compiled", lambda b: self.train_step(b, "compiled"))
        self.write_summary()
        shutil.rmtree(self.tmp, ignore_errors=True)
        ok = all(r.status in ("passed", "skipped") for r in self.results)
        self.say(f"done: {'all stages passed' if ok else 'SOME STAGES FAILED'}; see {self.out / 'summary.md'}")
        self.log.close()
        return 0 if ok else 1


def _fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _rel_files(folder: Path, base: Path) -> list[str]:
    return sorted(str(p.relative_to(base)) for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []


def _pytest_counts(out: str) -> dict:
    """{'passed': n, 'failed': n, 'skipped': n, ...} from pytest's last summary line."""
    lines = [ln for ln in out.splitlines() if re.search(r"\d+ (passed|failed|skipped|error|deselected)", ln)]
    if not lines:
        return {}
    return {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)",
                                             lines[-1])}


# ---------------------------------------------------------------------------------------------- no-sync worker
def no_sync_worker(report: Path, dry: bool) -> int:
    """Build a trainer on the demo data, warm up, then run one training step with every host sync recorded.

    On CUDA, torch.cuda.set_sync_debug_mode("warn") makes each synchronising call warn; we keep the tscd
    line that issued it. Expected: the step's returned losses (``float(...)`` in Trainer.train_step's return
    value), nothing else. On the CPU (dry run) the step runs and nothing can be recorded.
    """
    import traceback
    import warnings

    import torch

    from tscd.config import load_config
    from tscd.train import Trainer

    device = "cpu" if dry else "cuda"
    crop = 32 if dry else 320
    cfg = load_config(str(ROOT / "configs" / "demo.yaml"), [
        f"train.device={device}", f"data.crop_size={crop}", f"data.demo_size={crop}", "data.batch_size=2",
        "data.demo_num_train=8", "data.demo_num_val=2", "train.cam_iters=0", "train.tensorboard=false",
        f"train.run_dir={tempfile.mkdtemp(prefix='tscd_nosync_')}", "train.max_iters=1000"])
    trainer = Trainer(cfg, resume="never")
    batches = iter(trainer.train_loader)
    for _ in range(1 if dry else 2):  # warm-up: lazy initialisation, Triton compilation, cuDNN autotune
        trainer.iteration += 1
        trainer.train_step(next(batches))
    batch = next(batches)
    if device == "cuda":
        batch = {k: v.to(trainer.device, non_blocking=False) if torch.is_tensor(v) else v for k, v in batch.items()}
        torch.cuda.synchronize()
    syncs: list[str] = []

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):
            return
        frames = [f for f in traceback.extract_stack()[:-1] if "/tscd/" in f.filename.replace(os.sep, "/")]
        where = f"{frames[-1].filename.split('tscd', 1)[-1]}:{frames[-1].lineno} {frames[-1].line}" if frames else \
            f"{filename}:{lineno}"
        syncs.append(where)

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        old_show = warnings.showwarning
        warnings.showwarning = record
        try:
            if device == "cuda":
                torch.cuda.set_sync_debug_mode("warn")
            trainer.iteration += 1
            losses = trainer.train_step(batch)
        finally:
            if device == "cuda":
                torch.cuda.set_sync_debug_mode(0)
            warnings.showwarning = old_show
    expected = [s for s in syncs if "train/trainer.py" in s and "float(" in s]
    unexpected = [s for s in syncs if s not in expected]
    report.write_text(json.dumps({"device": device, "losses": losses, "expected": expected,
                                  "unexpected": unexpected, "recorded": device == "cuda"}, indent=1))
    print(f"no-sync step on {device}: {len(unexpected)} unexpected sync(s), {len(expected)} expected")
    for s in unexpected:
        print("  unexpected:", s)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument("--dry-run", action="store_true", help="the same stages on the CPU at tiny sizes")
    p.add_argument("--install", action="store_true", help="with --dry-run: run the install stage too (CPU build)")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma list (default all): {','.join(STAGES)}")
    p.add_argument("--total-budget", type=float, default=None,
                   help="seconds for all stages together (default 450 on a GPU, 1800 for a dry run)")
    p.add_argument("--budget", action="append", metavar="STAGE=SECONDS", help="override one stage's budget")
    p.add_argument("--no-sync-worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.no_sync_worker:
        return no_sync_worker(Path(args.no_sync_worker), args.dry_run)
    args.stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in args.stages if s not in STAGES]
    if unknown:
        p.error(f"unknown stage(s) {unknown}; choose from {', '.join(STAGES)}")
    if args.total_budget is None:
        args.total_budget = 1800.0 if args.dry_run else 450.0
    if not args.dry_run:
        try:
            import torch

            if not torch.cuda.is_available():
                p.error("no CUDA GPU visible: use --dry-run to rehearse on the CPU")
        except ImportError:
            p.error("torch is not installed in this Python")
    return Check(args).main()


if __name__ == "__main__":
    sys.exit(main())
