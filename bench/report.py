"""Render every benchmark result (bench/results/<device>/<op>.json) into bench/results/README.md, plot
time and memory per size and backend (bench/results/<device>/<op>.png), and regenerate the performance
section of the top-level README.md (between the `bench:begin` / `bench:end` markers). No number is
typed by hand: everything here comes from the JSON files the bench scripts wrote.

It also prints a roofline note per op: the bytes a fused kernel must move and the FLOPs it must do at
the benchmarked sizes (see ``traffic``), and the bandwidth / FLOP rate the measured time implies.

    python bench/report.py
"""
from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
README = Path(__file__).resolve().parents[1] / "README.md"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"

#: Peak memory bandwidth (GB/s) of devices we report on, for the roofline notes.
PEAK_BW_GBS = {"H100": 3350.0, "H200": 4800.0, "A100": 2039.0}


def traffic(op: str, row: dict) -> tuple[float, float] | None:
    """(minimal DRAM bytes, FLOPs) of the fused kernel for one benchmark row, or None if not modelled.

    refine (fwd): read the image (3N) and write n=48 weights per pixel, then per step read the weights
    and the maps (48N + KN) and write the maps (KN); FLOPs: ~70 per neighbour and pixel for the weights
    (mean and variance 12, appearance logit 18, variation 2, the two softmaxes 34 with an exp counted as
    15, the sum 4), 2 per neighbour, channel and pixel per step. fwd_bwd doubles both (the backward
    recomputes the weights; its transposed step moves the same bytes). The CPU kernel's padded rows
    (max dilation columns per side) add up to 2 * 24 / W of the weight traffic: not counted.
    """
    if op == "refine":
        side = int(str(row["size"]).split("x")[0])
        n_pix = row["B"] * side * side
        K, steps, n = row["K"], 10, 48
        bytes_ = 4 * n_pix * (3 + n + steps * (n + 2 * K))
        flops = n_pix * (70 * n + steps * 2 * n * K)
        mult = 2 if row.get("mode") == "fwd_bwd" else 1
        return bytes_ * mult, flops * mult
    if op == "correlation" and row.get("N1") and row.get("N2"):
        # sampled features in, nothing N1 x N2 out, B = 2, t1, t2 (Ct = 20), s1, s2 (Cs = 21). fwd: read the four
        # once; two dot products per pair (teacher and student). Student gradients (the bench's gradients reach
        # the student only): ds1 += D s2 and ds2 += D^T s1, 2 Cs FMAs per pair, writing ds1 and ds2. The cpp
        # backend computes them in the forward's sweep when autograd is on (fwd_grad; its backward only scales
        # them): fwd_grad = fwd_bwd = one sweep with both. The other fused backends compute each tile once more
        # in the backward (fwd_bwd: two sweeps; fwd_grad = fwd).
        B, ct, cs = 2, 20, 21
        n1, n2 = row["N1"], row["N2"]
        bytes_ = 4 * B * (n1 + n2) * (ct + cs)
        flops = 2 * B * n1 * n2 * (ct + cs)
        grads_bytes, grads_flops = 4 * B * (n1 + n2) * cs, 2 * B * n1 * n2 * 2 * cs
        mode = row.get("mode")
        if row.get("backend") == "cpp" and mode in ("fwd_grad", "fwd_bwd"):
            return bytes_ + grads_bytes, flops + grads_flops
        if mode == "fwd_bwd":
            return 2 * bytes_ + grads_bytes, 2 * flops + grads_flops
        return bytes_, flops
    if op == "permutohedral" and row.get("what") == "filter":
        # estimate: N points on the x0.5 grid, D = 5, each splats to D + 1 vertices; K values per vertex are
        # written (splat), read and written once per lattice direction (blur, D + 1 passes), read (slice).
        side = int(str(row["size"]).split("grid ")[1].split("^")[0])
        n_pts, D, K, B = side * side, 5, row["K"], row["B"]
        verts = n_pts * (D + 1)
        bytes_ = 4 * B * K * verts * (2 + 2 * (D + 1))
        flops = 2 * B * K * verts * (2 + 3 * (D + 1))
        return bytes_, flops
    if op == "permutohedral" and row.get("what") == "crf":
        # compulsory DRAM traffic per image (the buffers are far larger than the 2 MiB L2): N points, K classes
        # padded to S = 8 * ceil(K / 8) per row, the two kernels (D = 2, 5) with M vertices (M / N measured on
        # the bench's 500x375 scene: 0.13 for D = 2, 0.40 for D = 5). Per iteration: -U read and Q written once
        # (2 S N); per kernel, Q read by the splat (S N), the vertex values written by it (S M), read and written
        # by each of the D + 1 blur passes (2 (D + 1) S M) and read by the slice (S M), and each point's D + 1
        # vertex indices and weights (8 bytes each) read by the splat and by the slice. A point's vertex rows
        # count once: neighbouring points share them from cache. FLOPs: 3 per splatted, 4 per blurred, 2 per
        # sliced value, 4 per message, ~20 per exp of the softmax. Lattice construction is not counted.
        n_pts, K = row["N"] * row["B"], row["K"]
        S, iters = 8 * math.ceil(K / 8), int(str(row.get("mode", "10 iter")).split()[0])
        bytes_, flops = 4 * 2 * S * n_pts, 20 * K * n_pts
        for D, m_per_n in ((2, 0.13), (5, 0.40)):
            pts_v, M = n_pts * (D + 1), m_per_n * n_pts
            bytes_ += 4 * S * (n_pts + M + 2 * (D + 1) * M + M) + 2 * 8 * pts_v
            flops += S * (3 * pts_v + 4 * M * (D + 1) + 2 * pts_v + 4 * n_pts)
        return bytes_ * iters, flops * iters
    return None


def _fmt(v) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "n/a"
        return f"{v:.3g}"
    return "" if v is None else str(v)


def load_all(results: Path) -> list[dict]:
    out = []
    for path in sorted(results.glob("*/*.json")):
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or "op" not in data or "rows" not in data:
            continue  # not a benchmark result (e.g. a training run's scores kept beside them)
        data["path"] = path
        out.append(data)
    return out


def table(data: dict) -> list[str]:
    rows = data["rows"]
    cols = data.get("columns") or [[k, k] for k in rows[0]]
    lines = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(k)) for k, _ in cols) + " |" for r in rows]
    return lines


def roofline(data: dict) -> list[str]:
    op, env = data["op"], data["env"]
    peak = next((bw for name, bw in PEAK_BW_GBS.items() if name in env["device"]), None)
    lines = []
    for r in data["rows"]:
        if r.get("backend") in (None, "torch"):
            continue
        t = traffic(op, r)
        if t is None or not r.get("ms"):
            continue
        bytes_, flops = t
        secs = r["ms"] / 1e3
        achieved = bytes_ / secs / 1e9
        line = (f"- {r.get('size')} K={r.get('K', '')} {r.get('mode') or ''} {r['backend']}: needs "
                f"{bytes_ / 2**20:.1f} MiB "
                f"and {flops / 1e9:.2f} GFLOP; measured {r['ms']:.2f} ms = {achieved:.1f} GB/s, "
                f"{flops / secs / 1e9:.1f} GFLOP/s")
        shares = []
        if peak:
            shares.append(f"{100 * achieved / peak:.0f} % of the {peak:.0f} GB/s peak")
        elif env.get("peak_copy_gbs"):
            # CPU: the measured copy bandwidth on the row's threads (dense_crf's 1-thread rows: the 1-thread copy)
            one = (r.get("threads") or env.get("threads")) == 1 and env.get("peak_copy_gbs_1t")
            bw = env["peak_copy_gbs_1t"] if one else env["peak_copy_gbs"]
            shares.append(f"{100 * achieved / bw:.0f} % of this CPU's {bw:.0f} GB/s copy bandwidth"
                          + (" on 1 thread" if one else ""))
        if env.get("peak_fp32_gflops"):
            # the peak was measured on the run's threads; a row on fewer (dense_crf on 1) gets its linear share
            threads = r.get("threads") or env.get("threads") or 1
            cpu_peak = env["peak_fp32_gflops"] * threads / (env.get("threads") or threads)
            shares.append(f"{100 * flops / secs / 1e9 / cpu_peak:.1f} % of this CPU's {cpu_peak:.0f} GFLOP/s fp32 "
                          f"matmul peak on {threads} thread{'s' if threads > 1 else ''}"
                          + (", scaled from the measured one" if threads != env.get("threads") else ""))
        if shares:
            line += " (" + "; ".join(shares) + ")"
        lines.append(line)
    return lines


def plot(data: dict) -> Path | None:
    rows = [r for r in data["rows"] if "backend" in r and "ms" in r and "size" in r]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    groups = {}
    for r in rows:
        key = (r["backend"], r.get("mode", ""), r.get("K", ""))
        groups.setdefault(key, []).append(r)
    for (backend, mode, K), rs in sorted(groups.items(), key=lambda kv: str(kv[0])):
        label = f"{backend} {mode} K={K}" if K != "" else f"{backend} {mode}"
        xs = [str(r["size"]) for r in rs]
        style = dict(marker="o", label=label, linestyle="--" if backend == "torch" else "-")
        axes[0].plot(xs, [r["ms"] for r in rs], **style)
        axes[1].plot(xs, [r.get("peak_mib", float("nan")) for r in rs], **style)
    axes[0].set_ylabel("median time (ms)")
    axes[1].set_ylabel("peak memory (MiB)")
    for ax in axes:
        ax.set_yscale("log")
        ax.set_xlabel("size")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=6, loc="best")
    fig.suptitle(f"{data['op']} on {data['env']['device']}", fontsize=9)
    fig.tight_layout()
    out = data["path"].with_suffix(".png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, default=RESULTS, help="results folder (default bench/results)")
    p.add_argument("--readme", type=Path, default=README, help="README whose performance section is regenerated")
    args = p.parse_args(argv)
    results = args.results
    all_data = load_all(results)
    if not all_data:
        print("no results under bench/results/<device>/ yet", file=sys.stderr)
        return 1
    page = ["# Benchmark results", "",
            "Generated by `python bench/report.py` from the JSON files beside this page; do not edit by hand.", ""]
    summary = []
    memory = memory_rows(all_data)
    for data in all_data:
        env = data["env"]
        rel = data["path"].relative_to(results)
        page += [f"## {data['op']} — {env['device']}", "",
                 f"`{rel}` · torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, "
                 f"threads {env['threads']}, git {env['git']}, {env['date']}"
                 + (f", load average {env['load_average']}" if env.get("load_average") else "")
                 + (f", fp32 matmul peak {env['peak_fp32_gflops']:.0f} GFLOP/s" if env.get("peak_fp32_gflops") else "")
                 + (f", copy bandwidth {env['peak_copy_gbs']:.0f} GB/s" if env.get("peak_copy_gbs") else "")
                 + (f" ({env['peak_copy_gbs_1t']:.0f} on 1 thread)" if env.get("peak_copy_gbs_1t") else ""),
                 ""]
        if data.get("notes"):
            page += [data["notes"], ""]
        page += table(data) + [""]
        notes = roofline(data)
        if notes:
            page += ["Roofline (minimal traffic of the fused kernel):", ""] + notes + [""]
        png = plot(data)
        if png is not None:
            page += [f"![{data['op']}]({png.relative_to(results)})", ""]
        summary += _summary_rows(data)
    (results / "README.md").write_text("\n".join(page) + "\n")
    _update_readme(args.readme, summary, memory)
    print(f"wrote {results / 'README.md'} and the README performance section ({len(all_data)} result files)")
    return 0


def _summary_rows(data: dict) -> list[str]:
    """One line per fused backend row that has speed-up / memory ratios against torch."""
    out = []
    dev = data["env"]["device"]
    for r in data["rows"]:
        if r.get("path") in ("fast", "default"):  # bench_train_step: the whole iteration vs reference-style
            if data["rows"][0].get("path") not in ("reference", "reference-style"):  # no official-style baseline
                continue
            mem = _ratio(r.get("mem_ratio"), inverse=True)
            out.append(f"| train iteration | {dev} | {r['model']} crop {r['crop']} batch {r['batch']}{_width(data)} | "
                       f"{r['path']} path | {_fmt(r['s_per_it'])} s | {_fmt(r['speedup'])}x | {mem} |")
            continue
        if r.get("backend") in (None, "torch") or "speedup" not in r:
            continue
        case = " ".join(f"{k}={r[k]}" for k in ("size", "K", "S", "mode") if k in r)
        out.append(f"| {data['op']} | {dev} | {case} | {r['backend']} | {_fmt(r['ms'])} ms | "
                   f"{_fmt(r['speedup'])}x | {_ratio(r.get('mem_ratio'))} |")
    return out


def _width(data: dict) -> str:
    """", 80 classes" for a bench_train_step file run with --classes (its name ends in -c<N>), else ""."""
    m = re.search(r"-c(\d+)$", data["op"])
    return f", {m.group(1)} classes" if m else ""


def memory_rows(all_data: list[dict]) -> list[str]:
    """Markdown rows of the training-memory table: every configuration of each bench_train_step result that
    measured peak memory (reference-style, default, low-memory, ... whichever ran), side by side with its time."""
    out = []
    for data in all_data:
        rows = data["rows"]
        if not data["op"].startswith("train_step") or not any(r.get("path") != rows[0]["path"] for r in rows):
            continue
        dev = data["env"]["device"]
        base = rows[0]["path"]
        for r in rows:
            peak = r.get("peak_mib")
            if not isinstance(peak, (int, float)) or math.isnan(peak):
                continue
            out.append(f"| {dev} | {r['model']} crop {r['crop']}, global batch {r['batch']}{_width(data)} | "
                       f"{r['path']} | {r.get('amp', '')} | {r.get('checkpointing', '')} | "
                       f"{r.get('micro_batch', '')} | {peak:.0f} | {_fmt(r.get('mem_ratio'))}x {base} | "
                       f"{_seconds(r['s_per_it'])} |")
    return out


def _seconds(value: float) -> str:
    return f"{value:.0f}" if value >= 100 else _fmt(value)


def _ratio(value, inverse: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "not measured"
    return f"{_fmt(1.0 / value if inverse else value)}x"


def _update_readme(readme: Path, summary: list[str], memory: list[str] | None = None) -> None:
    if not readme.is_file():
        return
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        return
    body = ["", "| op | device | case | backend | time | speed-up vs torch | less memory vs torch |",
            "|---|---|---|---|---|---|---|", *summary, ""]
    if memory:
        body += ["Memory of one whole training iteration (all losses on) per configuration; peak = tensor bytes "
                 "(weights, gradients, optimizer state, activations; on the CPU from the allocator's events):", "",
                 "| device | setting | configuration | amp | checkpointing | micro-batch | peak MiB | memory | "
                 "s / iteration |", "|---|---|---|---|---|---|---|---|---|", *memory, "",
                 "The memory ratios carry over between devices (same method for every row); CPU times come from a "
                 "shared machine (its load is on the results page) and CPU bf16 is slow, so the low-memory row's "
                 "CPU time says nothing about a GPU.", ""]
    body += ["Full tables, plots and roofline notes: [bench/results/README.md](bench/results/README.md).", ""]
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(head + BEGIN + "\n".join(body) + END + tail)


if __name__ == "__main__":
    raise SystemExit(main())
