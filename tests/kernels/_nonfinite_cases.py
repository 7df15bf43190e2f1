"""Cases and runner of the non-finite fuzz test (tests/kernels/test_nonfinite.py).

Every public op gets random tiny shapes (odd sizes, 1-pixel sides) with a few entries of one input replaced by
NaN, +-inf, +-1e12 or a denormal. ``run_case`` calls the op (forward, then backward with a fixed finite upstream
gradient) and returns its outputs or the error it raised. Run as a script (``python _nonfinite_cases.py BACKEND
IN OUT``) it runs every case of IN on BACKEND and saves the results to OUT: the test runs the native backends
this way, in a child process, so that a crash (a segfault) fails the test instead of killing pytest.
"""
from __future__ import annotations

import sys

import torch

SPECIALS = (float("nan"), float("inf"), float("-inf"), 1e12, -1e12, 1e-40)  # 1e-40: a float32 denormal
OPS = ("refine", "correlation_loss", "permutohedral_filter", "dense_energy_loss", "dense_crf")


def _inject(t: torch.Tensor, gen: torch.Generator, value: float, count: int) -> torch.Tensor:
    t = t.clone()
    flat = t.view(-1)
    idx = torch.randint(0, flat.numel(), (count,), generator=gen)
    flat[idx] = value
    return t


def _rint(gen: torch.Generator, lo: int, hi: int) -> int:
    """A random int in [lo, hi]."""
    return int(torch.randint(lo, hi + 1, (1,), generator=gen))


def _pick(gen: torch.Generator, options):
    return options[_rint(gen, 0, len(options) - 1)]


def _side(gen: torch.Generator, hi: int) -> int:
    """1 a third of the time (1-pixel borders), else a random (often odd) size up to ``hi``."""
    return 1 if _rint(gen, 0, 2) == 0 else _rint(gen, 2, hi)


def make_case(op: str, index: int, seed: int = 0) -> dict:
    """Case ``index`` of ``op``: {"tensors": {...}, "kwargs": {...}, "target": name, "value": v}. Case 0 is clean."""
    gen = torch.Generator().manual_seed(seed * 1000 + index * 7 + OPS.index(op))
    value = None if index == 0 else SPECIALS[(index - 1) % len(SPECIALS)]
    count = _rint(gen, 1, 3)
    B = _rint(gen, 1, 2)
    kwargs: dict = {}
    if op == "refine":
        H, W = _side(gen, 9), _side(gen, 9)
        K = _rint(gen, 1, 3)
        h, w = (H, W) if _rint(gen, 0, 1) else (_side(gen, 6), _side(gen, 6))
        tensors = {"image": torch.rand(B, 3, H, W, generator=gen), "cam": torch.rand(B, K, h, w, generator=gen)}
        kwargs = dict(dilations=_pick(gen, [(1,), (1, 2), (2, 3)]), num_iter=_rint(gen, 0, 2),
                      mode=_pick(gen, ["varm", "par"]))
        if _rint(gen, 0, 2) == 0:
            kwargs["num_channels"] = [_rint(gen, 0, K) for _ in range(B)]
        targets = ("image", "cam")
    elif op == "correlation_loss":
        Ct, Cs = _rint(gen, 1, 4), _rint(gen, 1, 3)
        sizes = [(_side(gen, 6), _side(gen, 6)) for _ in range(2)]
        tensors = {"teacher1": torch.randn(B, Ct, *sizes[0], generator=gen),
                   "teacher2": torch.randn(B, Ct, *sizes[1], generator=gen),
                   "student1": torch.randn(B, Cs, *sizes[0], generator=gen),
                   "student2": torch.randn(B, Cs, *sizes[1], generator=gen)}
        if _rint(gen, 0, 1):
            kwargs["dense"] = True
        else:
            n1, n2 = _rint(gen, 1, 7), _rint(gen, 1, 7)
            tensors["coords1"] = torch.rand(B, n1, 2, generator=gen) * 2 - 1
            tensors["coords2"] = torch.rand(B, n2, 2, generator=gen) * 2 - 1
        kwargs.update(clamp_student=bool(_rint(gen, 0, 3)), center_teacher=bool(_rint(gen, 0, 3)),
                      teacher_grad=bool(_rint(gen, 0, 1)))
        targets = ("teacher1", "teacher2", "student1", "student2")
    elif op == "permutohedral_filter":
        K, D, N = _rint(gen, 1, 3), _pick(gen, [1, 2, 5]), _rint(gen, 1, 40)
        tensors = {"values": torch.rand(B, K, N, generator=gen), "features": torch.randn(B, D, N, generator=gen) * 2}
        kwargs = dict(normalize=bool(_rint(gen, 0, 1)), include_self=bool(_rint(gen, 0, 2)))
        targets = ("values", "features")
    elif op == "dense_energy_loss":
        K, H, W = _rint(gen, 1, 3), _rint(gen, 2, 11), _rint(gen, 2, 11)
        tensors = {"images": torch.rand(B, 3, H, W, generator=gen) * 255,
                   "probs": torch.softmax(torch.randn(B, K, H, W, generator=gen), 1),
                   "roi": (torch.rand(B, H, W, generator=gen) > 0.2).float(),
                   "label": torch.randint(0, K, (B, H, W), generator=gen)}
        kwargs = dict(scale=_pick(gen, [0.5, 1.0]), sigma_xy=10.0)
        targets = ("images", "probs", "roi")
    elif op == "dense_crf":
        K, H, W = _rint(gen, 2, 3), _side(gen, 10), _side(gen, 10)
        tensors = {"image": torch.rand(B, 3, H, W, generator=gen) * 255,
                   "probs": torch.softmax(torch.randn(B, K, H, W, generator=gen) * 2, 1)}
        kwargs = dict(num_iter=_rint(gen, 0, 3))
        targets = ("image", "probs")
    else:
        raise ValueError(op)
    target = targets[((index - 1) // len(SPECIALS)) % len(targets)]  # round r of the specials goes to target r
    if value is not None:
        tensors[target] = _inject(tensors[target], gen, value, count)
    return {"op": op, "index": index, "tensors": tensors, "kwargs": kwargs, "target": target, "value": value}


# Inputs that receive a gradient (and the upstream gradient is a fixed finite tensor).
GRAD_INPUTS = {"refine": ("cam",), "correlation_loss": ("student1", "student2"), "permutohedral_filter": ("values",),
               "dense_energy_loss": ("probs",), "dense_crf": ()}


def num_cases(op: str) -> int:
    """The clean case plus every special value in every target input."""
    return 1 + len(SPECIALS) * {"refine": 2, "correlation_loss": 4, "permutohedral_filter": 2, "dense_energy_loss": 3,
                                "dense_crf": 2}[op]


def run_case(case: dict, backend: str) -> dict:
    """{"out": tensor, "grads": {name: tensor}} or {"error": (type name, message)}."""
    import tscd.kernels as K

    op = case["op"]
    t = {k: v.clone() for k, v in case["tensors"].items()}
    for name in GRAD_INPUTS[op]:
        t[name].requires_grad_(True)
    kw = dict(case["kwargs"], backend=backend)
    try:
        if op == "refine":
            out = K.refine(t["image"], t["cam"], **kw)
        elif op == "correlation_loss":
            if "coords1" in t:
                kw["coords"] = (t.pop("coords1"), t.pop("coords2"))
            if kw.get("teacher_grad"):
                t["teacher1"].requires_grad_(True)
            out = K.correlation_loss(t["teacher1"], t["teacher2"], t["student1"], t["student2"], **kw)
        elif op == "permutohedral_filter":
            out = K.permutohedral_filter(t["values"], t["features"], **kw)
        elif op == "dense_energy_loss":
            out = K.dense_energy_loss(t["images"], t["probs"], t["roi"], t["label"], **kw)
        else:
            out = K.dense_crf(t["image"], t["probs"], **kw)
    except (ValueError, TypeError, RuntimeError) as exc:
        return {"error": (type(exc).__name__, str(exc))}
    grads = {}
    leaves = [n for n in GRAD_INPUTS[op] + ("teacher1",) if n in t and t[n].requires_grad]
    if leaves and out.requires_grad:
        upstream = torch.linspace(0.5, 1.5, out.numel()).view(out.shape).to(out.dtype)
        out.backward(upstream)
        grads = {n: t[n].grad for n in leaves if t[n].grad is not None}
    return {"out": out.detach(), "grads": grads}


def main(argv: list[str]) -> int:
    backend, in_path, out_path = argv
    cases = torch.load(in_path, weights_only=False)
    results = []
    for case in cases:
        # the last line on stderr names the case that was running when a crash killed the process
        print(f"running {case['op']} case {case['index']} ({case['target']} <- {case['value']})", file=sys.stderr,
              flush=True)
        results.append(run_case(case, backend))
    torch.save(results, out_path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
