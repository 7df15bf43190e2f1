"""Benchmark of the permutohedral op family (docs/method.md 4.5, 6, 8): the lattice filter against the exact dense
Gaussian, the CRF energy loss per training iteration and dense-CRF inference.

    python bench/bench_permutohedral.py --device cpu --sizes 160,256 --out bench/results

Rows:
  filter  the loss's filter (5-D features (x, y)/50, rgb/15 on the x0.5 grid) of K class maps for a batch;
          lattice (cpp or cuda) vs the exact dense filter (torch), with the lattice's relative error vs exact
          (plain sum and normalised) measured first on the same inputs;
  loss    dense_energy_loss forward and forward+backward at image size S (grid S/2), K classes, batch B;
  crf     dense_crf (10 iterations, docs/method.md 6 defaults) on one S x S image with K classes (lattice
          backends only);
  crf 500x375 (CPU, --cases voc): dense_crf on a VOC-size image (W x H = 500 x 375, 21 classes, 10 iterations,
          the eval's settings, tscd/eval/crf.py) on 1 and 2 threads (torch.set_num_threads: the op's
          at::parallel_for uses torch's intra-op threads), beside pydensecrf2's DenseCRF2D with the same
          parameters when it is importable (an optional peer, single-threaded: it has no threading), with the
          time ratio cpp / pydensecrf2 (the two timed alternately, the median of the per-round ratios) and the
          fraction of pixels whose label equals pydensecrf2's.
Inputs: a synthetic image with smooth shading, sharp edges and noise (natural images behave alike); random
softmax probabilities (voc: noisy softmax probabilities that follow the image's objects on most pixels).
Results: bench/results/permutohedral-<device>.json and .md.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import environment, peak_memory, quantiles, setup_threads, sync, time_fn, write_results  # noqa: E402
from tscd.kernels import dense_crf, dense_energy_loss, permutohedral_filter  # noqa: E402
from tscd.kernels.reference.permutohedral import MAX_DENSE_POINTS, crf_features  # noqa: E402


def synthetic_image(B: int, S: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.arange(S, dtype=torch.float32), torch.arange(S, dtype=torch.float32), indexing="ij")
    imgs = []
    for b in range(B):
        shade = torch.stack([128 + 90 * torch.sin(x / (17 + b)), 128 + 70 * torch.cos(y / 23),
                             128 + 50 * torch.sin((x + y) / 31)])
        disc = ((x - S * 0.5) ** 2 + (y - S * 0.45) ** 2 < (S * 0.25) ** 2).float()
        box = ((x > S * 0.1) & (x < S * 0.35) & (y > S * 0.6)).float()
        img = shade * (1 - disc) + torch.tensor([220.0, 40, 40]).view(3, 1, 1) * disc
        img = img * (1 - box) + torch.tensor([30.0, 200, 60]).view(3, 1, 1) * box
        imgs.append(img + 6 * torch.randn(3, S, S, generator=g))
    return torch.stack(imgs).clamp(0, 255).to(device)


def voc_scene(W: int = 500, H: int = 375, K: int = 21, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """A generated VOC-like scene: a smooth shaded background with discs and boxes of flat colours (sharp edges)
    and small integer noise, uint8 (3, H, W); noisy softmax probabilities (1, K, H, W) whose argmax follows the
    objects on most pixels. tests/kernels/test_dense_crf_pydensecrf.py draws its fixture from it: change it only
    with that fixture."""
    g = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32), indexing="ij")
    s = max(W, H) / 500.0
    img = torch.stack([128 + 90 * torch.sin(x / (37 * s)), 128 + 70 * torch.cos(y / (23 * s)),
                       128 + 50 * torch.sin((x + y) / (51 * s))])
    lab = torch.zeros(H, W, dtype=torch.long)
    for r in range(8):
        cx, cy, rad = torch.rand(3, generator=g) * torch.tensor([W, H, 120.0 * s]) + torch.tensor([0, 0, 30.0 * s])
        col = torch.randint(0, 256, (3,), generator=g).float()
        disc = (x - cx) ** 2 + (y - cy) ** 2 < rad ** 2
        m = disc if r % 2 == 0 else ((x - cx).abs() < rad) & ((y - cy).abs() < rad / 2)
        img[:, m] = col.view(3, 1)
        lab[m] = 1 + r % (K - 1) if K > 1 else 0
    img = (img + torch.randint(-4, 5, (3, H, W), generator=g).float()).clamp(0, 255).round().to(torch.uint8)
    logits = 1.5 * torch.randn(K, H, W, generator=g)
    logits[lab, torch.arange(H)[:, None], torch.arange(W)] += 1.0
    return img, logits.softmax(0)[None]


def _interleaved(fn_a, fn_b, min_run_time: float, min_rounds: int = 7) -> tuple[list[float], list[float]]:
    """Times (ms) of fn_a and fn_b called alternately, for at least min_rounds rounds and 2 * min_run_time s."""
    fn_a()
    fn_b()
    a, b = [], []
    end = time.perf_counter() + 2 * min_run_time
    while len(a) < min_rounds or time.perf_counter() < end:
        t = time.perf_counter()
        fn_a()
        a.append(1e3 * (time.perf_counter() - t))
        t = time.perf_counter()
        fn_b()
        b.append(1e3 * (time.perf_counter() - t))
    return a, b


def bench_voc_crf(threads_list: list[int], min_run_time: float, W: int = 500, H: int = 375, K: int = 21,
                  num_iter: int = 10) -> list[dict]:
    """dense_crf (cpp) on a W x H image vs pydensecrf2 (if importable), the eval's CRF settings."""
    import numpy as np

    from tscd.eval.crf import CRFParams

    p = CRFParams(num_iter=num_iter)
    img, probs = voc_scene(W, H, K)
    kw = dict(num_iter=p.num_iter, gauss_sxy=p.gauss_sxy, gauss_compat=p.gauss_compat,
              bilateral_sxy=p.bilateral_sxy, bilateral_srgb=p.bilateral_srgb, bilateral_compat=p.bilateral_compat)
    try:
        import pydensecrf.densecrf as dcrf
    except ImportError:
        dcrf = None
    unary = np.ascontiguousarray((-torch.log(probs[0].clamp_min(1e-5))).reshape(K, -1).numpy())
    rgb = np.ascontiguousarray(img.permute(1, 2, 0).numpy())

    def theirs():
        d = dcrf.DenseCRF2D(W, H, K)
        d.setUnaryEnergy(unary)
        d.addPairwiseGaussian(sxy=p.gauss_sxy, compat=p.gauss_compat)
        d.addPairwiseBilateral(sxy=p.bilateral_sxy, srgb=p.bilateral_srgb, rgbim=rgb, compat=p.bilateral_compat)
        return np.array(d.inference(p.num_iter))

    def ours():
        return dense_crf(img, probs, backend="cpp", **kw)

    base = {"what": "crf", "size": f"{W}x{H}", "K": K, "B": 1, "N": W * H, "mode": f"{num_iter} iter"}
    rows, ref_labels = [], None
    if dcrf is not None:
        ref_labels = theirs().reshape(K, H, W).argmax(0)
    old = torch.get_num_threads()
    try:
        for n, threads in enumerate(threads_list):
            torch.set_num_threads(threads)
            labels = ours()[0].argmax(0).numpy()
            row = {**base, "backend": "cpp", "threads": threads,
                   "changed_pixels": float((labels != probs[0].argmax(0).numpy()).mean())}
            if dcrf is None:
                row.update(time_fn(ours, torch.device("cpu"), threads=threads, min_run_time=min_run_time))
                rows.append(row)
                continue
            # interleaved: each round times pydensecrf2 then ours, so that drift of a shared host hits both alike;
            # the ratio is the median of the per-round ratios
            t_theirs, t_ours = _interleaved(theirs, ours, min_run_time)
            if n == 0:
                rows.append({**base, "backend": "pydensecrf2", "threads": 1, **quantiles(t_theirs)})
            row.update(quantiles(t_ours))
            row["ratio_pydensecrf"] = statistics.median(o / t for o, t in zip(t_ours, t_theirs))
            row["labels_eq_pydensecrf"] = float((labels == ref_labels).mean())
            rows.append(row)
    finally:
        torch.set_num_threads(old)
    return rows


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def bench(device: torch.device, sizes: list[int], K: int, B: int, threads: int, min_run_time: float) -> list[dict]:
    lattice = "cuda" if device.type == "cuda" else "cpp"
    rows = []
    for S in sizes:
        img = synthetic_image(B, S, device)
        g = torch.Generator().manual_seed(1)
        probs = torch.randn(B, K, S, S, generator=g).mul(3).softmax(1).to(device)
        roi = torch.ones(B, S, S, device=device)
        label = torch.randint(0, K, (B, S, S), generator=g).to(device)
        label[:, : S // 8] = 255
        # --- the filter alone: numerics first, then time
        feats = crf_features(F.interpolate(img, scale_factor=0.5, mode="nearest"), 50.0, 15.0)
        n = feats.shape[-1]
        values = F.interpolate(probs, scale_factor=0.5, mode="bilinear").reshape(B, K, n).contiguous()
        lat = permutohedral_filter(values, feats, backend=lattice)
        lat_n = permutohedral_filter(values, feats, normalize=True, backend=lattice)
        exact = exact_n = None
        if n <= MAX_DENSE_POINTS:
            exact = permutohedral_filter(values.double(), feats.double(), backend="torch")
            exact_n = permutohedral_filter(values.double(), feats.double(), normalize=True, backend="torch")
        row = {"what": "filter", "size": f"{S}^2 (grid {S // 2}^2)", "K": K, "B": B, "N": n, "backend": lattice,
               "rel_err_sum": rel(lat, exact) if exact is not None else None,
               "gain_sum": (lat.double().sum() / exact.sum()).item() if exact is not None else None,
               "rel_err_normalised": rel(lat_n, exact_n) if exact is not None else None}
        row.update(time_fn(lambda: permutohedral_filter(values, feats, backend=lattice), device, threads=threads,
                           min_run_time=min_run_time))
        row["peak_mb"] = peak_memory(lambda: permutohedral_filter(values, feats, backend=lattice), device) / 2 ** 20
        if n <= MAX_DENSE_POINTS:
            t = time_fn(lambda: permutohedral_filter(values, feats, backend="torch"), device, threads=threads,
                        min_run_time=min_run_time)
            row["torch_ms"] = t["ms"]
            row["speedup"] = t["ms"] / row["ms"]
        rows.append(row)
        # --- the loss per training iteration
        ref_loss = None
        if n <= MAX_DENSE_POINTS:
            ref_loss = dense_energy_loss(img.double(), probs.double(), roi, label, backend="torch").item()
        for backend in ([lattice, "torch"] if n <= MAX_DENSE_POINTS else [lattice]):
            p = probs.clone().requires_grad_()

            def fwd():
                return dense_energy_loss(img, p, roi, label, backend=backend)

            def fwd_bwd():
                p.grad = None
                fwd().backward()

            value = fwd().item()
            for mode, fn in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
                row = {"what": "loss", "size": f"{S}^2", "K": K, "B": B, "N": n, "backend": backend, "mode": mode,
                       "loss": value, "loss_vs_exact": value / ref_loss if ref_loss else None}
                row.update(time_fn(fn, device, threads=threads, min_run_time=min_run_time))
                rows.append(row)
        # --- dense CRF (test time): one image
        img1, probs1 = img[:1], probs[:1]
        q = dense_crf(img1, probs1, backend=lattice)
        row = {"what": "crf", "size": f"{S}^2", "K": K, "B": 1, "N": S * S, "backend": lattice, "mode": "10 iter",
               "changed_pixels": (q.argmax(1) != probs1.argmax(1)).float().mean().item()}
        row.update(time_fn(lambda: dense_crf(img1, probs1, backend=lattice), device, threads=threads,
                           min_run_time=min_run_time))
        rows.append(row)
        sync(device)
    return rows


def check_no_sync(device: torch.device, K: int, B: int, S: int) -> str:
    """Run the CUDA loss (fwd + bwd) with torch.cuda.set_sync_debug_mode('error')."""
    img = synthetic_image(B, S, device)
    probs = torch.randn(B, K, S, S, device=device).softmax(1).requires_grad_()
    roi = torch.ones(B, S, S, device=device)
    label = torch.randint(0, K, (B, S, S), device=device)
    dense_energy_loss(img, probs, roi, label, backend="cuda").backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        dense_energy_loss(img, probs, roi, label, backend="cuda").backward()
        result = "no host sync (set_sync_debug_mode('error') passed)"
    except RuntimeError as err:
        result = f"host sync detected: {err}"
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--sizes", default="160,256", help="image sizes S (S x S), comma-separated")
    ap.add_argument("--classes", type=int, default=21)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--min-run-time", type=float, default=1.0)
    ap.add_argument("--out", default=None, help="output folder (default bench/results)")
    ap.add_argument("--cases", default="sizes,voc",
                    help="sizes: the filter / loss / crf rows per --sizes; voc: dense_crf at 500x375 (CPU only)")
    ap.add_argument("--crf-threads", default="1,2", help="thread counts of the voc crf rows")
    args = ap.parse_args()
    device = torch.device(args.device)
    setup_threads(device, args.threads)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    env = environment(device, args.threads)
    cases = set(args.cases.split(","))
    rows = []
    if "sizes" in cases:
        rows += bench(device, sizes, args.classes, args.batch, args.threads, args.min_run_time)
    if "voc" in cases and device.type == "cpu":
        rows += bench_voc_crf([int(t) for t in args.crf_threads.split(",") if t], args.min_run_time)
    notes = ("filter: the CRF loss's 5-D Gaussian (x/50, y/50, rgb/15 on the x0.5 grid) of K maps; rel_err_* = "
             "relative L2 error of the lattice vs the exact dense filter on the same inputs (gain_sum: ratio of "
             "sums; the lattice's kernel is not exactly Gaussian, see tscd/kernels/permutohedral.py). loss: "
             "dense_energy_loss per training iteration (loss_vs_exact: lattice loss / exact loss). crf: dense_crf, "
             "10 iterations, one image (crf 500x375: threads = torch.set_num_threads for cpp; pydensecrf2 is "
             "single-threaded; cpp / pydensecrf2 = time ratio on the same image and parameters, the two timed "
             "alternately and the ratio the median of the per-round ratios). Times in ms "
             "(median, 20/80 % quantiles). peak MiB: torch tensors only (the cpp lattice's own scratch vectors "
             "are not counted).")
    if device.type == "cuda":
        notes += " " + check_no_sync(device, args.classes, args.batch, max(sizes))
    else:
        wait = os.environ.get("OMP_WAIT_POLICY", "")
        notes += (f" CPU figures with {args.threads} threads, OMP_WAIT_POLICY={wait!r}; "
                  f"load average at the end of the run: {', '.join(f'{x:.1f}' for x in _loadavg())} "
                  "(other processes share this machine, so these are upper bounds).")
    columns = [("what", "what"), ("size", "size"), ("K", "K"), ("B", "B"), ("backend", "backend"), ("mode", "mode"),
               ("threads", "threads"), ("ms", "ms"), ("ms_p20", "p20"), ("ms_p80", "p80"),
               ("torch_ms", "exact torch ms"),
               ("speedup", "speed-up"), ("rel_err_sum", "rel err (sum)"), ("gain_sum", "sum ratio"),
               ("rel_err_normalised", "rel err (normalised)"), ("loss_vs_exact", "loss / exact"),
               ("peak_mb", "peak MiB"), ("ratio_pydensecrf", "cpp / pydensecrf2"),
               ("labels_eq_pydensecrf", "labels equal to pydensecrf2 (fraction of pixels)")]
    out = Path(args.out) if args.out else None
    json_path, md_path = write_results("permutohedral", env, rows, columns, out, notes=notes)
    print(md_path.read_text())
    print(f"wrote {json_path} and {md_path}")


def _loadavg() -> tuple[float, ...]:
    try:
        return os.getloadavg()
    except OSError:
        return (math.nan,)


if __name__ == "__main__":
    main()
