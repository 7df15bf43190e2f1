"""Shared benchmark helpers: timing, peak memory, environment record, result files.

Timing: on CUDA ``triton.testing.do_bench`` (20/50/80 % quantiles, ms); on the CPU
``torch.utils.benchmark.Timer.blocked_autorange`` with a fixed thread count (quantiles of the
per-block times, ms).

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` above what was allocated before the call.
On the CPU there is no allocator statistic, so we replay the allocation events of torch's CPU
allocator recorded by the profiler (``profile_memory=True``) and report the highest sum of live
bytes during the call: tensor memory (including the extension's own ``at::empty`` buffers), not RSS.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device: torch.device, *, threads: int = 2,
            min_run_time: float = 1.0, warmup: bool = True) -> dict:
    """Median and 20/80 % quantiles of ``fn``'s run time in milliseconds.

    ``warmup=False`` skips the CPU warm-up call (when the caller already ran ``fn``, e.g. ``peak_memory``).
    """
    if device.type == "cuda":
        import triton.testing

        q20, q50, q80 = triton.testing.do_bench(fn, quantiles=[0.2, 0.5, 0.8])
        return {"ms": q50, "ms_p20": q20, "ms_p80": q80}
    from torch.utils.benchmark import Timer

    if warmup:
        fn()
    m = Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads).blocked_autorange(min_run_time=min_run_time)
    return {**quantiles([1e3 * t for t in m.times]), "ms": 1e3 * m.median}


def quantiles(times_ms: list[float]) -> dict:
    """Median and 20/80 % quantiles of run times already measured, in milliseconds."""
    ts = sorted(times_ms)

    def q(p: float) -> float:
        return ts[min(len(ts) - 1, int(p * len(ts)))]

    return {"ms": statistics.median(ts), "ms_p20": q(0.2), "ms_p80": q(0.8)}


def interleaved_times(steps: dict[str, Callable[[int], object]], rounds: int, device: torch.device | None = None,
                      on_step: Callable[[int, str, float], None] | None = None) -> dict[str, list[float]]:
    """Seconds of ``steps[name](k)`` in ``rounds`` interleaved rounds (round k runs every step once, the order
    reversed every other round): on a machine whose speed drifts, every step sees the same drift. ``on_step(k,
    name, seconds)`` after each step (progress)."""
    names = list(steps)
    times: dict[str, list[float]] = {n: [] for n in names}
    for k in range(rounds):
        for name in names if k % 2 == 0 else names[::-1]:
            if device is not None:
                sync(device)
            t0 = time.perf_counter()
            steps[name](k)
            if device is not None:
                sync(device)
            times[name].append(time.perf_counter() - t0)
            if on_step is not None:
                on_step(k, name, times[name][-1])
    return times


def peak_memory(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated by torch during one call of ``fn`` (above what was live before), measured by
    :class:`tscd.train.memory.PeakMemory` (CUDA: ``max_memory_allocated``; CPU: the allocator's events)."""
    from tscd.train.memory import PeakMemory

    if device.type == "cuda":
        sync(device)
        torch.cuda.empty_cache()
    with PeakMemory(device) as pm:
        fn()
    return int(pm.peak_bytes)


def _git_sha() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                                       stderr=subprocess.DEVNULL, text=True).strip()
    except Exception:
        return "unknown"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _best_seconds(fn: Callable[[], object], threads: int, reps: int) -> float:
    """The best of ``reps`` timed calls of ``fn`` on ``threads`` threads, after one warm-up call."""
    import time

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fn()
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
    finally:
        torch.set_num_threads(old)
    return best


def peak_fp32_gflops(threads: int, n: int = 2048, reps: int = 5) -> float:
    """The CPU's own fp32 compute ceiling on ``threads`` threads: the best of ``reps`` timed ``n`` x ``n``
    matmuls (torch's BLAS, the fastest fp32 code this machine runs), in GFLOP/s. The roofline notes compare
    each kernel's FLOP rate with it."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / _best_seconds(lambda: torch.mm(a, b), threads, reps) / 1e9


def peak_copy_gbs(threads: int, mib: int = 256, reps: int = 5) -> float:
    """The CPU's memory bandwidth ceiling on ``threads`` threads: the best of ``reps`` timed copies of a
    ``mib``-MiB fp32 tensor into another (far beyond the caches), counted as read + write bytes, in GB/s. The
    roofline notes compare each kernel's minimal traffic rate with it."""
    a = torch.ones(mib * 2**18)
    b = torch.empty_like(a)  # the warm-up call touches its pages first
    return 2 * a.nbytes / _best_seconds(lambda: b.copy_(a), threads, reps) / 1e9


def _load_average() -> str | None:
    try:
        return "%.2f %.2f %.2f" % os.getloadavg()
    except OSError:
        return None


def environment(device: torch.device, threads: int) -> dict:
    """Where and with what the figures were measured (CPU: with the cpp kernels' instruction set ``cpu_isa``, the
    machine's load average, its measured fp32 matmul peak ``peak_fp32_gflops`` and copy bandwidth
    ``peak_copy_gbs``, also on one thread when the run uses more: ``peak_copy_gbs_1t``)."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU: {_cpu_model()}",
        "device_type": device.type,
        "cpu": _cpu_model(),
        "threads": threads if device.type == "cpu" else None,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "git": _git_sha(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    if device.type == "cpu":
        from tscd.kernels import _ext

        env["cpu_isa"] = _ext.cpu_isa() if _ext.has_cpp() else None  # the cpp kernels' instruction set (TSCD_CPU_ISA)
        env["load_average"] = _load_average()
        env["peak_fp32_gflops"] = round(peak_fp32_gflops(threads), 1)
        env["peak_copy_gbs"] = round(peak_copy_gbs(threads), 1)
        if threads > 1:
            env["peak_copy_gbs_1t"] = round(peak_copy_gbs(1), 1)
    return env


def device_tag(env: dict) -> str:
    """Short file-name tag for the device: 'cpu-2t' or e.g. 'nvidia-h100-80gb-hbm3'."""
    if env["device_type"] == "cpu":
        return f"cpu-{env['threads']}t"
    return "".join(c if c.isalnum() else "-" for c in env["device"].lower()).strip("-")


def setup_threads(device: torch.device, threads: int) -> None:
    if device.type == "cpu":
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)


def write_results(op: str, env: dict, rows: list[dict], columns: list[tuple[str, str]], out_dir: Path | None = None,
                  notes: str = "") -> tuple[Path, Path]:
    """Write ``<out>/<device>/<op>.json`` and ``.md`` (a table with ``columns``: (key, header) pairs).

    ``out_dir`` defaults to bench/results; ``bench/report.py`` renders every JSON there.
    """
    out_dir = (Path(out_dir) if out_dir is not None else RESULTS_DIR) / device_tag(env)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = op
    json_path = out_dir / f"{stem}.json"
    json_path.write_text(json.dumps({"op": op, "env": env, "rows": rows, "columns": columns, "notes": notes},
                                    indent=2) + "\n")
    lines = [f"# {op} on {env['device']}", "",
             f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, "
             f"threads {env['threads']}, git {env['git']}, {env['date']}", ""]
    if notes:
        lines += [notes, ""]
    lines.append("| " + " | ".join(h for _, h in columns) + " |")
    lines.append("|" + "---|" * len(columns))
    for row in rows:
        cells = []
        for key, _ in columns:
            v = row.get(key, "")
            cells.append(f"{v:.3g}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    md_path = out_dir / f"{stem}.md"
    md_path.write_text("\n".join(lines) + "\n")
    return json_path, md_path
