"""Reading local checkpoint files safely and strict, explained loading of state dicts.

Nothing here downloads anything: weights come from a local path or not at all. Files are untrusted: safetensors
files are read with ``safetensors``, pickles only with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import logging
import os
import pickle
import re
import zipfile
from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)

#: Keys under which training scripts commonly nest the model's state dict.
WRAPPER_KEYS: tuple[str, ...] = ("state_dict", "model", "model_state_dict")
#: Key prefixes added by DDP (``module.``) and torch.compile (``_orig_mod.``).
STRIP_PREFIXES: tuple[str, ...] = ("module.", "_orig_mod.")
#: How many offending keys an error message lists per category.
MAX_LISTED: int = 8


#: Error text of ``torch.load(weights_only=True)`` that names a Python object the file wants to import.
_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")


class UnsafeCheckpointError(RuntimeError):
    """A pickle-based checkpoint that needs arbitrary unpickling (imports Python objects); refused, never run."""


def is_safetensors(path: str | os.PathLike) -> bool:
    """Whether ``path`` starts like a safetensors file (8-byte little-endian header size, then a JSON object).

    Decided from the bytes, not the file name: torch's zip checkpoints start with ``PK``, legacy ones with the
    pickle protocol byte ``0x80``.
    """
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return head[8:9] == b"{" and 2 <= n <= os.path.getsize(path) - 8


def _read_safetensors(path: str) -> dict:
    try:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
    except ImportError as e:
        raise RuntimeError(f"checkpoint file {path!r} is a safetensors file, and reading it needs the `safetensors` "
                           f"package: pip install safetensors") from e
    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise RuntimeError(f"checkpoint file {path!r} ({os.path.getsize(path)} bytes) looks like a safetensors file "
                           f"but could not be read: it is corrupt or truncated ({type(e).__name__}: {e})") from e


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Read a local checkpoint file without running any code from it.

    A safetensors file (recognised from its bytes) is read with ``safetensors``; anything else with
    ``torch.load(map_location="cpu", weights_only=True)``, which admits only tensors and plain containers. A
    pickle that needs arbitrary unpickling (it imports a Python object: a class, ``exec``, ``os.system``, a numpy
    array) is refused: nothing in it is executed.

    Raises:
        FileNotFoundError: ``path`` does not exist or is not a file.
        UnsafeCheckpointError: (a ``RuntimeError``) the pickle needs arbitrary unpickling; refused.
        RuntimeError: the file is corrupt, truncated, or not a checkpoint of tensors and plain containers.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        what = "is a directory, not a file" if os.path.isdir(path) else "does not exist"
        raise FileNotFoundError(f"checkpoint file {path!r} {what}. Weights are never downloaded: give the local "
                                f"path of the file (e.g. SegFormer's mit_b1.pth)")
    if is_safetensors(path):
        return _read_safetensors(path)
    try:
        with open(path, "rb") as f:  # a file object: torch.load picks no reader from the file name
            obj = torch.load(f, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError,
            UnicodeDecodeError, AttributeError, ImportError, TypeError) as e:
        size = os.path.getsize(path)
        unsafe = _GLOBAL_RE.search(str(e)) if isinstance(e, pickle.UnpicklingError) else None
        if unsafe is not None:
            raise UnsafeCheckpointError(
                f"checkpoint file {path!r} ({size} bytes) refused: it needs arbitrary unpickling (it imports the "
                f"Python object `{unsafe.group(1)}`, which torch.load(weights_only=True) does not allow), and "
                f"unpickling a downloaded file can run any code. Nothing from it was executed. tscd reads only "
                f"tensors and plain containers: use a .safetensors download, or, if you made the file yourself and "
                f"trust it, re-save its state dict of tensors"
                + (" (a truncated file can also look like this)" if unsafe.group(1).startswith("torch.") else "")
            ) from None
        first = str(e).splitlines()[0] if str(e) else ""
        raise RuntimeError(f"checkpoint file {path!r} ({size} bytes) could not be read by "
                           f"torch.load(weights_only=True): the file is corrupt, truncated or not a PyTorch "
                           f"checkpoint of tensors ({type(e).__name__}: {first})") from e
    if not isinstance(obj, Mapping):
        raise RuntimeError(f"checkpoint file {path!r} holds a {type(obj).__name__}, expected a dict (a state dict "
                           f"or a dict wrapping one under {list(WRAPPER_KEYS)})")
    return dict(obj)


def _holds_tensors(obj: Mapping) -> bool:
    return any(isinstance(v, Tensor) or (isinstance(v, Mapping) and _holds_tensors(v)) for v in obj.values())


def unwrap_state_dict(obj: Mapping) -> dict[str, Tensor]:
    """Return the state dict inside ``obj`` (nested under one of :data:`WRAPPER_KEYS`, possibly repeatedly).

    Raises:
        ValueError: no mapping of names to tensors is found.
    """
    while True:
        # descend into a wrapper key ("model", "state_dict", ...) when it holds tensors (training checkpoints
        # keep other tensors, e.g. RNG states, beside it); real state-dict keys are dotted names, never "model"
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping) and _holds_tensors(obj[k])),
                     None)
        if inner is None:
            break
        obj = inner
    sd = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    if not sd:
        raise ValueError(f"checkpoint holds no tensors: top-level keys {list(obj)[:MAX_LISTED]}; expected a state dict "
                         f"(name -> tensor), possibly under one of {list(WRAPPER_KEYS)}")
    return sd


def strip_prefixes(state_dict: Mapping[str, Tensor], prefixes: tuple[str, ...] = STRIP_PREFIXES
                   ) -> dict[str, Tensor]:
    """Remove leading ``module.`` / ``_orig_mod.`` prefixes (any order, repeated) from every key."""
    out = {}
    for k, v in state_dict.items():
        changed = True
        while changed:
            changed = False
            for p in prefixes:
                if k.startswith(p):
                    k, changed = k[len(p):], True
        out[k] = v
    return out


def _shape(t: Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def check_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor], what: str = "model",
                     key_note: Callable[[str], str] | None = None) -> None:
    """Raise a ``ValueError`` that lists every kind of mismatch between ``state_dict`` and ``model``.

    The message names the first :data:`MAX_LISTED` missing keys (with the shape the model expects), unexpected
    keys (with the shape found) and shape mismatches (expected vs found), and counts each category.
    ``key_note(key)``, if given, names the tensor in the file (for converted foreign formats); it is shown in
    brackets after the model's key.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [k for k in expected if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k].shape)]
    if not (missing or unexpected or mismatched):
        return
    def name(k: str) -> str:
        return k if key_note is None else f"{k} (in the file: {key_note(k)})"

    parts = [f"checkpoint does not fit the {what}:"]
    if mismatched:
        listed = ", ".join(f"{name(k)}: expected {_shape(expected[k])}, got {_shape(state_dict[k])}"
                           for k in mismatched[:MAX_LISTED])
        parts.append(f"{len(mismatched)} shape mismatch(es) [{listed}]")
    if missing:
        listed = ", ".join(f"{name(k)} {_shape(expected[k])}" for k in missing[:MAX_LISTED])
        parts.append(f"{len(missing)} missing key(s) [{listed}]")
    if unexpected:
        listed = ", ".join(f"{name(k)} {_shape(state_dict[k])}" for k in unexpected[:MAX_LISTED])
        parts.append(f"{len(unexpected)} unexpected key(s) [{listed}]")
    parts.append("(is it the right variant, e.g. mit_b1 weights for a mit_b1 model?)")
    raise ValueError(" ".join(parts))


def load_weights(model: nn.Module, path: str | os.PathLike,
                 filter_fn: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None = None,
                 what: str = "model") -> None:
    """Read ``path``, map it with ``filter_fn`` (default: unwrap and strip prefixes), load strictly into ``model``.

    Raises:
        FileNotFoundError: missing file.
        RuntimeError: unreadable (corrupt) file.
        ValueError: architecture mismatch (see :func:`check_state_dict`).
    """
    raw = read_checkpoint(path)
    try:
        sd = filter_fn(raw) if filter_fn is not None else strip_prefixes(unwrap_state_dict(raw))
        check_state_dict(model, sd, what)
    except ValueError as e:
        raise ValueError(f"{os.fspath(path)!r}: {e}") from None
    model.load_state_dict(sd, strict=True)
