"""correlation_loss: the SCD (self-correspondence distillation) loss of TSCD, docs/method.md 4.2.

Sample N1 points of view 1 and N2 points of view 2 (random, given, or every pixel), read teacher and
student maps there (bilinear, align_corners=True, border padding), L2-normalise every feature vector
over channels (eps 1e-10), then with F_ij = t1_i . t2_j (teacher) and G_ij = s1_i . s2_j (student):

    F~_ij = F_ij - mean_j' F_ij' + mean_{b',i',j'} F_i'j'       (centring; batch-wide last mean, as official)
    L     = - mean_{b,i,j} [ max(G_ij, 0) * (F~_ij - shift) ]

Backends: ``torch`` (the reference, tscd/kernels/reference/correlation.py: materialises both
N1 x N2 tensors per image) and the fused ``cuda``, ``triton`` and ``cpp`` (OpenMP) cores. The fused
ones share the sampling and normalisation (PyTorch, O(B*N*C)); centring and shift are folded into one
offset per view-1 point, c_i = -t1_i . mean_j t2_j + mean F - shift, computed in O(N*C) since F is
bilinear; the core then streams (i, j) tiles accumulating sum_ij P(G_ij) (F_ij + c_i) and, backward,
the masked GEMM-like gradients of the features, recomputing tiles: memory O(B*(N1+N2)*C) both ways (the
``cpp`` backward computes each tile once for both views' gradients, with one view-2 gradient buffer per thread).
On ``cpp``, a call with autograd on (a training step) runs the fused ``tscd::correlation_fwd_grad`` instead: one
sweep gives the loss and the gradients of each image's sum, which the backward only scales, so a training step
computes every tile once, not twice (forward+backward about 2x the loss alone, against 3.4x before; the
gradient work moves into the forward: under ``torch.no_grad`` only the loss is computed).
Gradients: to the student maps on every backend (through the sampling); to the teacher maps only
with ``teacher_grad=True`` (every backend).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tscd.kernels import _backend, _checks, _ext
from tscd.kernels.reference.correlation import (
    DEFAULT_NUM_SAMPLES,
    NORM_EPS,
    correlation_core_reference,
    normalize_features,
    pixel_coords,
    random_coords,
    sample_features,
)

OP = "correlation_loss"
SUPPORTED_BACKENDS: tuple[str, ...] = ("triton", "cuda", "cpp", "torch")


def _check_coords(name: str, c: object, B: int) -> torch.Tensor:
    _checks.check_tensor(OP, name, c, ndim=3, layout="(B, N, 2) of (x, y) in [-1, 1]")
    if c.shape[0] != B or c.shape[2] != 2:
        raise ValueError(f"{OP}: `{name}` must have shape (B={B}, N, 2) of (x, y) in [-1, 1]; "
                         f"got shape {tuple(c.shape)}")
    return c


def _positive_int(name: str, v: object) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"{OP}: `{name}` must be an int >= 1; got {v!r}")
    return v


def _dense_features(teacher: torch.Tensor, student: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every teacher pixel as a sample; the student read at the same places (its bilinear, align_corners=True
    resize to the teacher's size, which is what docs/method.md 4.2 does to the student anyway)."""
    if student.shape[-2:] != teacher.shape[-2:]:
        student = F.interpolate(student, size=teacher.shape[-2:], mode="bilinear", align_corners=True)
    return teacher.flatten(2).transpose(1, 2), student.flatten(2).transpose(1, 2)


def _pick(x: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    if idx is None:
        return x
    return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def _subsample(B: int, hw: int, num_samples: int | None, generator, device, view: str) -> torch.Tensor | None:
    """S*S distinct pixels per image (dense mode with ``num_samples``), or None for all of them."""
    if num_samples is None:
        return None
    n = num_samples * num_samples
    if n > hw:
        raise ValueError(f"{OP}: dense sampling of {num_samples}x{num_samples} = {n} distinct pixels per image, but "
                         f"{view} has only {hw} pixels; lower `num_samples` or leave it None to use every pixel")
    gen_device = generator.device if generator is not None else device
    keys = torch.rand(B, hw, generator=generator, device=gen_device)
    return keys.argsort(dim=1)[:, :n].to(device)


def sample_points(teacher1: torch.Tensor, teacher2: torch.Tensor, student1: torch.Tensor, student2: torch.Tensor, *,
                  num_samples: int | None = None, coords=None, dense: bool = False, matched: bool = False,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, ...]:
    """The sampled (not yet normalised) features (t1, t2, s1, s2), (B, N, C) each, as :func:`correlation_loss`
    takes them. Differentiable w.r.t. the maps. Arguments as in :func:`correlation_loss` (already checked)."""
    B = teacher1.shape[0]
    device = teacher1.device
    if dense:
        h1, w1 = teacher1.shape[-2:]
        idx1 = _subsample(B, h1 * w1, num_samples, generator, device, "view 1 (`teacher1`)")
        t1, s1 = (_pick(x, idx1) for x in _dense_features(teacher1, student1))
        if matched:  # view 2 read at view 1's pixel positions
            c = pixel_coords(h1, w1, device=device, dtype=teacher1.dtype).expand(B, -1, -1)
            c = _pick(c, idx1)
            return t1, sample_features(teacher2, c), s1, sample_features(student2, c)
        h2, w2 = teacher2.shape[-2:]
        idx2 = _subsample(B, h2 * w2, num_samples, generator, device, "view 2 (`teacher2`)")
        t2, s2 = (_pick(x, idx2) for x in _dense_features(teacher2, student2))
        return t1, t2, s1, s2
    if coords is not None:
        c1, c2 = (coords, coords) if isinstance(coords, torch.Tensor) else coords
    else:
        S = DEFAULT_NUM_SAMPLES if num_samples is None else num_samples
        c1 = random_coords(B, S, generator=generator, device=device, dtype=teacher1.dtype)
        c2 = c1 if matched else random_coords(B, S, generator=generator, device=device, dtype=teacher1.dtype)
    return (sample_features(teacher1, c1), sample_features(teacher2, c2), sample_features(student1, c1),
            sample_features(student2, c2))


def correlation_loss(teacher1: torch.Tensor, teacher2: torch.Tensor, student1: torch.Tensor, student2: torch.Tensor,
                     *, num_samples: int | None = None, coords=None, dense: bool = False, matched: bool = False,
                     generator: torch.Generator | None = None, clamp_student: bool = True,
                     center_teacher: bool = True, shift: float = 0.0, teacher_grad: bool = False,
                     backend: str = "auto") -> torch.Tensor:
    """The SCD correlation-distillation loss between two views (docs/method.md 4.2).

    ``L = -mean_{b,i,j}[P(G_ij) * (F~_ij - shift)]`` with G the student and F~ the (centred) teacher
    correlation of L2-normalised features at the sample points; ``P(g) = max(g, 0)`` with
    ``clamp_student`` (the reference), else ``g``. The shift is subtracted from the teacher term (the
    official ``-cd.clamp(0) * (fd - shift)``); ``shift=0`` is the reference.

    Sample points (one of):
        * random (default): per image and view an independent S x S grid of uniform coordinates in
          [-1, 1]^2 (S = ``num_samples``, default 40), drawn from ``generator`` (or the global RNG);
          N1 = N2 = S * S;
        * ``coords``: explicit points, a pair ``(coords1 (B, N1, 2), coords2 (B, N2, 2))`` or one tensor
          (B, N, 2) for both views, (x, y) in [-1, 1] (``grid_sample`` order and convention);
        * ``dense=True``: every pixel of each teacher map (N1 = h1 * w1, N2 = h2 * w2), no resampling; a
          student of another size is read at those pixels (its bilinear, align_corners=True resize). With
          ``num_samples`` S: S * S distinct random pixels per image and view instead.
    ``matched=True`` uses view 1's points for view 2 too (geometrically aligned sampling; the views of
    docs/method.md 4.2 share normalised coordinates): random and dense modes.

    Args:
        teacher1: (B, Ct, h1, w1) teacher maps of view 1 (CAMs), float, any device.
        teacher2: (B, Ct, h2, w2) teacher maps of view 2, same device.
        student1: (B, Cs, h1', w1') student maps of view 1 (segmentation logits); Cs may differ from Ct.
        student2: (B, Cs, h2', w2') student maps of view 2.
        num_samples: S, points per side of the random grid (default 40), or the dense subsample size.
        coords: explicit sample points (see above); excludes ``dense`` and ``num_samples``.
        dense: use every pixel (see above).
        matched: same points in both views.
        generator: torch.Generator for reproducible random points (on the CPU or the maps' device).
        clamp_student: zero-clamp the student correlation (default on, as the reference).
        center_teacher: pointwise centring of the teacher correlation (default on, as the reference).
        shift: subtracted from the teacher term (default 0).
        teacher_grad: let the gradient reach the teacher maps (default off: the teacher is a target).
        backend: ``"auto"``, ``"cuda"``, ``"triton"``, ``"cpp"`` or ``"torch"`` (see tscd.kernels).

    Returns:
        0-d tensor in the student's dtype. Half inputs are computed in float32 by the fused backends.

    Non-finite inputs: propagated like the reference, on every backend (no check, no host sync): a NaN or
    +-inf read by a sample point makes its feature vector NaN after the normalisation, so the loss is NaN
    (``max(G, 0)`` keeps NaN, as torch's clamp does); the gradients are the reference's (torch's clamp
    passes no gradient through a NaN G, the other factors carry the NaN on).

    Raises:
        TypeError: a non-float tensor. ValueError: bad shapes, devices or arguments (e.g. more dense
        samples than pixels). RuntimeError: the requested backend cannot run here.
    """
    _checks.check_tensor(OP, "teacher1", teacher1, ndim=4, layout="(B, Ct, h1, w1)")
    _checks.check_tensor(OP, "teacher2", teacher2, ndim=4, layout="(B, Ct, h2, w2)")
    _checks.check_tensor(OP, "student1", student1, ndim=4, layout="(B, Cs, h1, w1)")
    _checks.check_tensor(OP, "student2", student2, ndim=4, layout="(B, Cs, h2, w2)")
    _checks.check_same_batch(OP, teacher1=teacher1, teacher2=teacher2, student1=student1, student2=student2)
    device = _checks.check_same_device(OP, teacher1=teacher1, teacher2=teacher2, student1=student1,
                                       student2=student2)
    if teacher1.shape[1] != teacher2.shape[1]:
        raise ValueError(f"{OP}: `teacher1` and `teacher2` must have the same channels Ct; got {teacher1.shape[1]} "
                         f"and {teacher2.shape[1]}")
    if student1.shape[1] != student2.shape[1]:
        raise ValueError(f"{OP}: `student1` and `student2` must have the same channels Cs; got {student1.shape[1]} "
                         f"and {student2.shape[1]}")
    B = teacher1.shape[0]
    if num_samples is not None:
        _positive_int("num_samples", num_samples)
    if coords is not None:
        if dense or num_samples is not None:
            raise ValueError(f"{OP}: give either `coords`, `num_samples` or `dense`, not several")
        if isinstance(coords, torch.Tensor):
            coords = (_check_coords("coords", coords, B),) * 2
        elif isinstance(coords, (tuple, list)) and len(coords) == 2:
            coords = (_check_coords("coords1", coords[0], B), _check_coords("coords2", coords[1], B))
        else:
            raise TypeError(f"{OP}: `coords` must be a tensor (B, N, 2) or a pair of them; got {type(coords).__name__}")
        _checks.check_same_device(OP, teacher1=teacher1, coords1=coords[0], coords2=coords[1])
        if matched and coords[0].shape[1] != coords[1].shape[1]:
            raise ValueError(f"{OP}: matched sampling needs N1 == N2; got coords of {coords[0].shape[1]} and "
                             f"{coords[1].shape[1]} points")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{OP}: `generator` must be a torch.Generator; got {type(generator).__name__}")
    name = _backend.resolve_backend("correlation_fwd", backend, device, SUPPORTED_BACKENDS)

    out_dtype = student1.dtype
    if name != "torch":  # the fused cores run in float32 (float64 kept for gradcheck)
        dtype = torch.float64 if student1.dtype == torch.float64 else torch.float32
        teacher1, teacher2, student1, student2 = (x.to(dtype) for x in (teacher1, teacher2, student1, student2))
    if not teacher_grad:
        teacher1, teacher2 = teacher1.detach(), teacher2.detach()
    t1, t2, s1, s2 = sample_points(teacher1, teacher2, student1, student2, num_samples=num_samples, coords=coords,
                                   dense=dense, matched=matched, generator=generator)
    if name == "torch":
        t1, t2, s1, s2 = (normalize_features(x) for x in (t1, t2, s1, s2))
        return correlation_core_reference(t1, t2, s1, s2, clamp_student=clamp_student, center_teacher=center_teacher,
                                          shift=shift, teacher_grad=teacher_grad).to(out_dtype)
    t1, t2, s1, s2 = (_normalize_fast(x) for x in (t1, t2, s1, s2))
    offset = teacher_offset(t1, t2, center_teacher=center_teacher, shift=shift)
    if name == "triton":
        per_image = torch.ops.tscd.correlation_fwd_triton(t1, t2, s1, s2, offset, bool(clamp_student))
    elif name == "cpp" and torch.is_grad_enabled() and any(x.requires_grad for x in (t1, t2, s1, s2, offset)):
        # a training step: the gradients come from the forward's own tiles (one sweep instead of two); the teacher
        # side's only where something of it needs them
        per_image = torch.ops.tscd.correlation_fwd_grad(
            t1, t2, s1, s2, offset, bool(clamp_student), any(x.requires_grad for x in (t1, t2, offset)))[0]
    else:
        per_image = torch.ops.tscd.correlation_fwd(t1, t2, s1, s2, offset, bool(clamp_student))
    loss = -per_image.sum() / (B * t1.shape[1] * t2.shape[1])
    return loss.to(out_dtype)


def _normalize_fast(x: torch.Tensor) -> torch.Tensor:
    """normalize_features for the fused backends, contiguous: ``x / sqrt(max(sum x^2, eps^2))``, which is
    ``x / max(||x||, eps)`` (the same value up to rounding, the same gradient: zero vectors get 1/eps and NaN or inf
    spread alike) at a fraction of the cost of ``F.normalize`` over a short channel dimension of (B, N, C) features
    (~0.1 against ~2.8 ms at N = 6400, C = 21 on 2 CPU threads)."""
    x = x.contiguous()
    return x / x.pow(2).sum(dim=-1, keepdim=True).clamp_min(NORM_EPS ** 2).sqrt()


def teacher_offset(t1: torch.Tensor, t2: torch.Tensor, *, center_teacher: bool, shift: float) -> torch.Tensor:
    """c_i with F~_ij - shift = F_ij + c_i: (B, N1), O(B*N*C) (F is bilinear: mean_j F_ij = t1_i . mean_j t2_j,
    and the batch-wide mean of F is mean_b (mean_i t1_i) . (mean_j t2_j))."""
    if not center_teacher:
        return torch.full(t1.shape[:2], -float(shift), dtype=t1.dtype, device=t1.device)
    u = t2.mean(dim=1)  # (B, Ct)
    row_mean = torch.bmm(t1, u.unsqueeze(-1)).squeeze(-1)  # (B, N1)
    global_mean = (t1.mean(dim=1) * u).sum(dim=-1).mean()
    return (global_mean - float(shift) - row_mean).contiguous()


# ---------------------------------------------------------------------------------------------
# Op registrations: fake kernels (shapes for torch.compile) and autograd for the C++/CUDA ops of
# tscd._C, and the Triton path as a torch.library.custom_op with the same treatment.
# ---------------------------------------------------------------------------------------------

def _setup_context(ctx, inputs, output):
    t1, t2, s1, s2, offset, clamp_student = inputs
    ctx.save_for_backward(t1, t2, s1, s2, offset)
    ctx.clamp_student = clamp_student


def _make_backward(bwd_op):
    def backward(ctx, grad):
        t1, t2, s1, s2, offset = ctx.saved_tensors
        need = ctx.needs_input_grad
        teacher_grad = bool(need[0] or need[1] or need[4])
        if not (teacher_grad or need[2] or need[3]):
            return None, None, None, None, None, None
        ds1, ds2, dt1, dt2, doff = bwd_op(grad.contiguous(), t1, t2, s1, s2, offset, ctx.clamp_student, teacher_grad)
        return (dt1 if need[0] else None, dt2 if need[1] else None, ds1 if need[2] else None,
                ds2 if need[3] else None, doff if need[4] else None, None)

    return backward


def _fwd_grad_setup_context(ctx, inputs, output):
    ctx.teacher_grad = inputs[6]
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(*output[1:])


def _fwd_grad_backward(ctx, grad, *unused):
    """The fused op's gradients were computed for grad = 1 per image: scale them by the incoming one."""
    ds1, ds2, dt1, dt2, dc = ctx.saved_tensors
    need = ctx.needs_input_grad
    if (need[0] or need[1] or need[4]) and not ctx.teacher_grad:
        raise RuntimeError("tscd::correlation_fwd_grad: a teacher input or the offset requires grad, but the op ran "
                           "with teacher_grad=False, so their gradients were not computed")
    g = grad.contiguous()
    g3 = g.view(-1, 1, 1)
    return (dt1 * g3 if need[0] else None, dt2 * g3 if need[1] else None, ds1 * g3 if need[2] else None,
            ds2 * g3 if need[3] else None, dc * g.view(-1, 1) if need[4] else None, None, None)


def _fwd_grad_fake(t1, t2, s1, s2, offset, clamp_student, teacher_grad):
    def teacher(x):
        return torch.empty_like(x) if teacher_grad else x.new_empty(0)

    return (t1.new_empty(t1.shape[0]), torch.empty_like(s1), torch.empty_like(s2), teacher(t1), teacher(t2),
            teacher(offset))


def _fwd_fake(t1, t2, s1, s2, offset, clamp_student):
    return t1.new_empty(t1.shape[0])


def _bwd_fake(grad, t1, t2, s1, s2, offset, clamp_student, teacher_grad):
    return [torch.empty_like(s1), torch.empty_like(s2), torch.empty_like(t1), torch.empty_like(t2),
            torch.empty_like(offset)]


def _register_cpp_ops() -> None:
    torch.library.register_fake("tscd::correlation_fwd")(_fwd_fake)
    torch.library.register_fake("tscd::correlation_bwd")(_bwd_fake)
    torch.library.register_autograd("tscd::correlation_fwd", _make_backward(torch.ops.tscd.correlation_bwd),
                                    setup_context=_setup_context)
    torch.library.register_fake("tscd::correlation_fwd_grad")(_fwd_grad_fake)
    torch.library.register_autograd("tscd::correlation_fwd_grad", _fwd_grad_backward,
                                    setup_context=_fwd_grad_setup_context)


def _triton_args(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """The Triton kernels take float32 (the interpreter and tl.dot); float64 is computed in float32."""
    return [t.to(torch.float32).contiguous() for t in tensors]


@torch.library.custom_op("tscd::correlation_fwd_triton", mutates_args=())
def _correlation_fwd_triton(t1: torch.Tensor, t2: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor,
                            offset: torch.Tensor, clamp_student: bool) -> torch.Tensor:
    from tscd.kernels._triton.correlation import correlation_fwd_triton

    return correlation_fwd_triton(*_triton_args(t1, t2, s1, s2, offset), clamp_student).to(t1.dtype)


@torch.library.custom_op("tscd::correlation_bwd_triton", mutates_args=())
def _correlation_bwd_triton(grad: torch.Tensor, t1: torch.Tensor, t2: torch.Tensor, s1: torch.Tensor,
                            s2: torch.Tensor, offset: torch.Tensor, clamp_student: bool,
                            teacher_grad: bool) -> list[torch.Tensor]:
    from tscd.kernels._triton.correlation import correlation_bwd_triton

    grads = correlation_bwd_triton(*_triton_args(grad, t1, t2, s1, s2, offset), clamp_student, teacher_grad)
    return [g.to(ref.dtype) for g, ref in zip(grads, (s1, s2, t1, t2, offset))]


_correlation_fwd_triton.register_fake(_fwd_fake)
_correlation_bwd_triton.register_fake(_bwd_fake)
_correlation_fwd_triton.register_autograd(_make_backward(_correlation_bwd_triton), setup_context=_setup_context)

if _ext.has_cpp():
    _register_cpp_ops()
