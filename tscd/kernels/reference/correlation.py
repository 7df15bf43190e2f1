"""Reference for ``correlation_loss``: the SCD (self-correspondence distillation) loss, docs/method.md 4.2.

Plain, differentiable PyTorch that materialises both N1 x N2 correlation tensors per image, written
the way the official code computes the loss (STEGO-style ``helper``: correlation of L2-normalised
features, "pointwise" teacher centring with the batch-wide mean, zero-clamped student correlation).
Works on any device and in float64. This is ``backend="torch"`` and the oracle of the tests; the
sampling helpers here are shared by every backend (the fused ops start after sampling).

Notation (per image b; i indexes view-1 points, j view-2 points):
    t1_i, t2_j  teacher features (Ct channels), s1_i, s2_j student features (Cs channels), all
                L2-normalised over channels: x / max(||x||_2, 1e-10) (``F.normalize``)
    F_ij = t1_i . t2_j            G_ij = s1_i . s2_j
    F~_ij = F_ij - mean_j' F_ij' + mean_{b', i', j'} F_i'j'    (centring; the last mean is batch-wide,
                                                               as in the official code)
    L = - mean_{b, i, j} [ max(G_ij, 0) * (F~_ij - shift) ]
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

#: Samples per side of the random S x S grid of each view (the official ``feature_samples``).
DEFAULT_NUM_SAMPLES = 40
#: eps of the L2 normalisation of every sampled feature vector (the official ``norm``).
NORM_EPS = 1e-10


def normalize_features(x: torch.Tensor) -> torch.Tensor:
    """(B, N, C) -> (B, N, C) with unit L2 norm over channels: ``x / max(||x||, 1e-10)``."""
    return F.normalize(x, dim=-1, eps=NORM_EPS)


def random_coords(batch: int, num_samples: int, *, generator: torch.Generator | None = None,
                  device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Uniform random coordinates in [-1, 1]^2: (B, S * S, 2) as (x, y), drawn like the official code.

    The official code draws a (B, S, S, 2) tensor with ``torch.rand(...) * 2 - 1``; this draws the
    same tensor (from ``generator`` when given) and flattens the S x S grid into N = S * S points.
    """
    gen_device = generator.device if generator is not None else device
    coords = torch.rand(batch, num_samples, num_samples, 2, generator=generator, device=gen_device,
                        dtype=torch.float32) * 2 - 1
    return coords.reshape(batch, num_samples * num_samples, 2).to(device=device, dtype=dtype)


def pixel_coords(height: int, width: int, *, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The normalised (align_corners=True) coordinates of every pixel, row-major: (H * W, 2) as (x, y)."""
    ys = torch.linspace(-1.0, 1.0, height, device=device, dtype=dtype) if height > 1 else torch.zeros(
        1, device=device, dtype=dtype)
    xs = torch.linspace(-1.0, 1.0, width, device=device, dtype=dtype) if width > 1 else torch.zeros(
        1, device=device, dtype=dtype)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx, gy], dim=-1).reshape(height * width, 2)


def sample_features(x: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bilinear reads of ``x`` (B, C, h, w) at ``coords`` (B, N, 2) in [-1, 1] -> (B, N, C).

    ``F.grid_sample`` with align_corners=True and border padding, as the official ``sample``.
    Differentiable w.r.t. ``x``.
    """
    out = F.grid_sample(x, coords.to(x.dtype).unsqueeze(2), mode="bilinear", padding_mode="border",
                        align_corners=True)  # (B, C, N, 1)
    return out.squeeze(3).transpose(1, 2)


def correlation_core_reference(t1: torch.Tensor, t2: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor, *,
                               clamp_student: bool = True, center_teacher: bool = True, shift: float = 0.0,
                               teacher_grad: bool = False) -> torch.Tensor:
    """The loss on already sampled, L2-normalised features, materialising the N1 x N2 tensors.

    Args:
        t1: (B, N1, Ct) normalised teacher features of view 1; t2: (B, N2, Ct) of view 2.
        s1: (B, N1, Cs) normalised student features of view 1; s2: (B, N2, Cs) of view 2.
        clamp_student: use max(G, 0) (the official zero clamp) instead of G.
        center_teacher: pointwise centring of F (official ``pointwise``).
        shift: subtracted from the (centred) teacher correlation.
        teacher_grad: let the gradient flow into ``t1``/``t2`` (the official code: no).

    Returns:
        0-d tensor, the loss.
    """
    with torch.set_grad_enabled(teacher_grad and torch.is_grad_enabled()):
        fd = torch.einsum("bic,bjc->bij", t1, t2)  # (B, N1, N2)
        if center_teacher:
            old_mean = fd.mean()
            fd = fd - fd.mean(dim=2, keepdim=True)
            fd = fd - fd.mean() + old_mean
    if not teacher_grad:
        fd = fd.detach()
    cd = torch.einsum("bic,bjc->bij", s1, s2)  # (B, N1, N2)
    if clamp_student:
        cd = cd.clamp(min=0.0)
    return -(cd * (fd - shift)).mean()


def correlation_loss_reference(teacher1: torch.Tensor, teacher2: torch.Tensor, student1: torch.Tensor,
                               student2: torch.Tensor, coords1: torch.Tensor, coords2: torch.Tensor, *,
                               clamp_student: bool = True, center_teacher: bool = True, shift: float = 0.0,
                               teacher_grad: bool = False) -> torch.Tensor:
    """The SCD loss at given sample points (docs/method.md 4.2), as the official code computes it.

    Args:
        teacher1: (B, Ct, h1, w1), teacher2: (B, Ct, h2, w2) teacher maps (CAMs) of the two views.
        student1: (B, Cs, h1', w1'), student2: (B, Cs, h2', w2') student maps (segmentation logits).
        coords1: (B, N1, 2), coords2: (B, N2, 2) sample points (x, y) in [-1, 1] of view 1 / view 2;
            a (B, S, S, 2) grid of the official code is the same set of points as its reshape to (B, S * S, 2).
        clamp_student, center_teacher, shift, teacher_grad: see :func:`correlation_core_reference`.

    Returns:
        0-d tensor, differentiable w.r.t. the student maps (and the teacher maps with ``teacher_grad``).
    """
    with torch.set_grad_enabled(teacher_grad and torch.is_grad_enabled()):
        t1 = normalize_features(sample_features(teacher1, coords1))
        t2 = normalize_features(sample_features(teacher2, coords2))
    s1 = normalize_features(sample_features(student1, coords1))
    s2 = normalize_features(sample_features(student2, coords2))
    return correlation_core_reference(t1, t2, s1, s2, clamp_student=clamp_student, center_teacher=center_teacher,
                                      shift=shift, teacher_grad=teacher_grad)
