"""torch.compile for the trainer's network work (``train.compile``), with the numerics of eager mode.

Two things differ from a bare ``torch.compile``:

* Random ops (drop-path, dropout) draw from the eager generator in eager order (inductor's ``fallback_random``),
  so a compiled iteration consumes the same random numbers as an eager one and gives the same result up to
  float rounding; a checkpoint can resume compiled what was trained eager, and the reverse.
* :class:`StaticCompiled` compiles a function once per input shape (``dynamic=False``: the CAM passes' shapes are
  few and repeat every iteration, three scales x the views), logs each new graph (compiling takes tens of seconds
  on a CPU, a first iteration is slow for that reason), and runs eager past ``max_graphs`` distinct shapes instead
  of recompiling forever.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch

logger = logging.getLogger(__name__)

#: inductor options of every compile of ours: random ops through the eager generator (the same draws as eager)
COMPILE_OPTIONS: dict[str, Any] = {"fallback_random": True}

#: distinct input shapes a :class:`StaticCompiled` compiles before it runs eager
MAX_GRAPHS: int = 32


def compile_module(module: torch.nn.Module) -> Callable:
    """``torch.compile(module)`` with :data:`COMPILE_OPTIONS` (the trained forward and its backward)."""
    return torch.compile(module, options=COMPILE_OPTIONS)


@contextlib.contextmanager
def recompile_limit(n: int) -> Iterator[None]:
    """Raise dynamo's per-function graph limit to at least ``n`` while inside (torch >= 2.6 names it
    ``recompile_limit``, older versions ``cache_size_limit``)."""
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    with cfg.patch(**{name: max(n, getattr(cfg, name))}):
        yield


def _signature(args: tuple) -> tuple:
    """What selects a graph: tensor shapes and dtypes, the other arguments' values (modules by identity), grad
    and autocast mode."""
    def one(a: Any) -> Any:
        if isinstance(a, torch.Tensor):
            return ("tensor", tuple(a.shape), a.dtype, a.device.type)
        if isinstance(a, torch.nn.Module):
            return ("module", id(a), a.training)
        if isinstance(a, (bool, int, float, str, type(None))):
            return a
        return ("object", id(a))
    return (tuple(one(a) for a in args), torch.is_grad_enabled(), torch.is_autocast_enabled())


class StaticCompiled:
    """``fn`` compiled with static shapes, one graph per :func:`_signature` of its arguments (module docstring).

    Args:
        fn: the function (its arguments: tensors, modules, plain values).
        what: its name in the log ("the CAM pass").
        max_graphs: distinct signatures compiled; later ones run ``fn`` eager (one warning).
        backend: torch.compile's backend (tests use ``"eager"``).

    Attributes:
        graphs: the signatures compiled so far, in order.
    """

    def __init__(self, fn: Callable, what: str, max_graphs: int = MAX_GRAPHS, backend: str = "inductor") -> None:
        self.fn, self.what, self.max_graphs = fn, what, max_graphs
        options = COMPILE_OPTIONS if backend == "inductor" else None
        self.compiled = torch.compile(fn, dynamic=False, backend=backend, options=options)
        self.graphs: list[tuple] = []
        self._warned = False

    def __call__(self, *args: Any) -> Any:
        sig = _signature(args)
        if sig not in self.graphs:
            if len(self.graphs) >= self.max_graphs:
                if not self._warned:
                    logger.warning("train.compile: %s met more than %d input shapes; new shapes run eager",
                                   self.what, self.max_graphs)
                    self._warned = True
                return self.fn(*args)
            self.graphs.append(sig)
            shapes = [list(a.shape) for a in args if isinstance(a, torch.Tensor)]
            logger.info("train.compile: compiling %s for input %s (graph %d; a CPU takes tens of seconds)",
                        self.what, shapes[0] if len(shapes) == 1 else shapes, len(self.graphs))
        with recompile_limit(self.max_graphs + 1):
            return self.compiled(*args)
