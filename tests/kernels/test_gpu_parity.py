"""GPU parity of every backend on CUDA tensors, incl. half inputs, the shape families we train at (VOC and COCO
channel counts), the device guard and the no-host-sync promise. Skipped without a GPU (``pytest -m gpu``).

References run on the CPU: the torch reference in float64 (refine, correlation) or the cpp backend
(permutohedral), from the very same (possibly half-rounded) inputs, so a half dtype only loosens the output
rounding, not the comparison.
"""
from __future__ import annotations

import pytest
import torch

from tests._utils import assert_close
from tests.conftest import require_backend
from tscd.kernels import correlation_loss, permutohedral_filter, refine
from tscd.kernels.correlation import SUPPORTED_BACKENDS as CORR_BACKENDS
from tscd.kernels.permutohedral import SUPPORTED_BACKENDS as PERM_BACKENDS
from tscd.kernels.refine import SUPPORTED_BACKENDS as REFINE_BACKENDS

pytestmark = pytest.mark.gpu

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
#: (rtol, atol) of the output, by dtype: the kernels compute in float32 and round the result once
TOL = {torch.float64: (1e-6, 1e-9), torch.float32: (1e-4, 2e-5), torch.bfloat16: (2e-2, 1e-2),
       torch.float16: (4e-3, 2e-3)}
FAMILIES = {"voc": (21, 20), "coco": (81, 80)}  # (student Cs, teacher Ct)


# ---------------------------------------------------------------------------------------------- refine
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("K,ragged", [(21, False), (81, True)])
def test_refine_cuda_parity(backend, dtype, K, ragged):
    require_backend("refine_fwd", backend, "cuda", REFINE_BACKENDS)
    B, H, W = 2, 45, 52
    img = torch.rand(B, 3, H, W).to(dtype)
    cam = torch.randn(B, K, 12, 13).to(dtype)
    nc = [K, K // 3] if ragged else None
    ref_cam = cam.double().requires_grad_()
    ref = refine(img.double(), ref_cam, num_iter=5, num_channels=nc, backend="torch")
    cam_g = cam.cuda().requires_grad_()
    out = refine(img.cuda(), cam_g, num_iter=5, num_channels=nc, backend=backend)
    assert out.dtype == dtype and out.device.type == "cuda"
    rtol, atol = TOL[dtype]
    assert_close(out.cpu(), ref, rtol=rtol, atol=atol, name=f"refine {backend} {dtype}")
    g = torch.randn(ref.shape, dtype=torch.float64)
    ref.backward(g)
    out.backward(g.to(dtype).cuda())
    assert_close(cam_g.grad.cpu(), ref_cam.grad, rtol=max(rtol, 1e-3), atol=max(atol, 1e-4),
                 name=f"refine grad {backend} {dtype}")


# ---------------------------------------------------------------------------------------------- correlation
def _corr_maps(family, dtype):
    cs, ct = FAMILIES[family]
    return (torch.randn(2, ct, 24, 20).to(dtype), torch.randn(2, ct, 20, 26).to(dtype),
            torch.randn(2, cs, 24, 20).to(dtype), torch.randn(2, cs, 20, 26).to(dtype))


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype,teacher_grad", [(torch.float32, False), (torch.float32, True),
                                                (torch.bfloat16, False), (torch.float16, False)], ids=str)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_correlation_cuda_parity(backend, dtype, family, teacher_grad):
    """Dense sampling (no RNG), every pass of the fused core at the VOC and COCO channel counts (the tile
    configurations differ by channel count)."""
    require_backend("correlation_fwd", backend, "cuda", CORR_BACKENDS)
    maps = _corr_maps(family, dtype)
    ref_leaves = [m.double().requires_grad_() for m in maps]
    ref = correlation_loss(*ref_leaves, dense=True, teacher_grad=teacher_grad, backend="torch")
    leaves = [m.cuda().requires_grad_() for m in maps]
    loss = correlation_loss(*leaves, dense=True, teacher_grad=teacher_grad, backend=backend)
    assert loss.dtype == dtype
    rtol, atol = TOL[dtype]
    assert_close(loss.cpu(), ref, rtol=max(rtol, 1e-4), atol=atol * 1e-2, name=f"correlation {backend} {dtype}")
    wrt = slice(None) if teacher_grad else slice(2, None)
    ref_grads = torch.autograd.grad(ref, ref_leaves[wrt])
    grads = torch.autograd.grad(loss, leaves[wrt])
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        scale = r.abs().max().item()
        assert_close(g.cpu(), r, rtol=max(rtol, 1e-3), atol=max(atol, 1e-4) * scale + 1e-9,
                     name=f"correlation grad {i} {backend} {dtype}")


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_correlation_cuda_large_coco(backend):
    """40 x 40 random points per view (the training default) at COCO's channel counts, many tiles."""
    require_backend("correlation_fwd", backend, "cuda", CORR_BACKENDS)
    maps = [torch.randn(2, c, 32, 32) for c in (80, 80, 81, 81)]
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    coords = (torch.rand(2, 1600, 2, generator=gen()) * 2 - 1, torch.rand(2, 1600, 2, generator=gen()) * 2 - 1)
    ref_leaves = [m.double().requires_grad_() for m in maps]
    ref = correlation_loss(*ref_leaves, coords=tuple(c.double() for c in coords), backend="torch")
    leaves = [m.cuda().requires_grad_() for m in maps]
    loss = correlation_loss(*leaves, coords=tuple(c.cuda() for c in coords), backend=backend)
    assert_close(loss.cpu(), ref, rtol=1e-4, atol=1e-7, name=f"{backend} loss")
    for g, r in zip(torch.autograd.grad(loss, leaves[2:]), torch.autograd.grad(ref, ref_leaves[2:])):
        assert_close(g.cpu(), r, rtol=1e-3, atol=1e-4 * r.abs().max().item(), name=f"{backend} grad")


# ---------------------------------------------------------------------------------------------- permutohedral
def _perm_inputs(B, K, H, W, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    img = torch.rand(B, 3, H, W, generator=gen)
    yy, xx = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32),
                            indexing="ij")
    feats = torch.cat([torch.stack([xx, yy]).expand(B, 2, H, W) / 8.0, img * 255.0 / 13.0], 1).reshape(B, 5, -1)
    values = torch.rand(B, K, H * W, generator=gen)
    return values.to(dtype), feats.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_permutohedral_cuda_parity(dtype):
    require_backend("permutohedral_fwd", "cuda", "cuda", PERM_BACKENDS)
    values, feats = _perm_inputs(2, 21, 37, 41, dtype)
    ref = permutohedral_filter(values, feats, normalize=True, backend="cpp")
    out = permutohedral_filter(values.cuda(), feats.cuda(), normalize=True, backend="cuda")
    assert out.dtype == dtype
    rtol, atol = {torch.float64: (1e-9, 1e-9), torch.float32: (1e-4, 1e-5), torch.bfloat16: (2e-2, 1e-2)}[dtype]
    assert_close(out.cpu(), ref, rtol=rtol, atol=atol, name=f"permutohedral cuda {dtype}")


def test_permutohedral_cuda_chunks_of_channels():
    """More (image, channel) pairs than one chunk of vertex values holds: every chunk filters like a call of its
    own (the lattice is shared; atomics make the sums order-dependent, hence the float tolerance)."""
    require_backend("permutohedral_fwd", "cuda", "cuda", PERM_BACKENDS)
    values, feats = _perm_inputs(2, 96, 192, 192)  # N (d+1) = 221,184: 2^25 / that = 151 pairs per chunk < 192
    values, feats = values.cuda(), feats.cuda()
    full = permutohedral_filter(values, feats, normalize=False, backend="cuda")
    for k in (0, 50, 95):  # first, middle, last channel; image 1 lies in the second chunk
        one = permutohedral_filter(values[:, k:k + 1].contiguous(), feats, normalize=False, backend="cuda")
        assert_close(full[:, k:k + 1], one, rtol=1e-5, atol=1e-5, name=f"channel {k}")


# ---------------------------------------------------------------------------------------------- device guard
needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")


@needs_two_gpus
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_kernels_run_on_the_inputs_gpu_not_the_current_one(backend):
    require_backend("refine_fwd", backend, "cuda", REFINE_BACKENDS)
    img, cam = torch.rand(1, 3, 33, 35), torch.randn(1, 3, 9, 9)
    maps = _corr_maps("voc", torch.float32)
    torch.cuda.set_device(0)
    r0 = refine(img.to("cuda:0"), cam.to("cuda:0"), backend=backend)
    c0 = correlation_loss(*(m.to("cuda:0") for m in maps), dense=True, backend=backend)
    r1 = refine(img.to("cuda:1"), cam.to("cuda:1"), backend=backend)
    c1 = correlation_loss(*(m.to("cuda:1") for m in maps), dense=True, backend=backend)
    torch.cuda.synchronize(1)
    assert r1.device == torch.device("cuda:1") and c1.device == torch.device("cuda:1")
    assert_close(r1.cpu(), r0.cpu(), rtol=1e-6, atol=1e-7, name="refine on cuda:1")
    assert_close(c1.cpu(), c0.cpu(), rtol=1e-6, atol=1e-8, name="correlation on cuda:1")


# ---------------------------------------------------------------------------------------------- no host sync
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_fused_ops_do_not_sync_with_the_host(backend):
    """refine and correlation_loss, forward and backward, with torch.cuda.set_sync_debug_mode("error")."""
    require_backend("refine_fwd", backend, "cuda", REFINE_BACKENDS)
    img = torch.rand(2, 3, 64, 64, device="cuda")
    cam = torch.randn(2, 21, 16, 16, device="cuda", requires_grad=True)
    maps = [m.cuda().requires_grad_() for m in _corr_maps("coco", torch.float32)]
    gen = torch.Generator(device="cuda").manual_seed(0)

    def step():
        refine(img, cam, backend=backend).sum().backward()
        correlation_loss(*maps, num_samples=16, generator=gen, backend=backend).backward()

    step()  # warm-up: compilation, lazy initialisation
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
