"""Checkpoints that never lose work: written to a temporary file, fsync'ed, then renamed into place.

A kill during a write leaves a temporary ``.ckpt_XXXXXXX.pt.<pid>.<random>.tmp`` behind;
:func:`remove_stale_tmp` deletes those of dead processes when a run starts. :func:`find_resumable` picks the newest
checkpoint that loads, skipping (and reporting) corrupt or truncated ones.
"""
from __future__ import annotations

import logging
import os
import random
import re
import tempfile
from pathlib import Path

import numpy as np
import torch

from tscd.errors import CheckpointError

logger = logging.getLogger(__name__)
PATTERN = re.compile(r"^ckpt_(\d+)\.pt$")
#: Temporary files of :func:`atomic_save` for checkpoints: ``.ckpt_0001000.pt.<pid>.<mkstemp chars>.tmp`` (files of
#: older versions have no ``<pid>.`` part).
TMP_PATTERN = re.compile(r"^\.ckpt_\d+\.pt\.(?:(\d+)\.)?[A-Za-z0-9_]+\.tmp$")
#: Keys every trainer checkpoint holds (a file without them cannot be resumed from).
REQUIRED_KEYS = ("iteration", "epoch", "batches_in_epoch", "model", "optimizer", "scheduler", "rng")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_save(obj: dict, path: str | Path) -> None:
    """torch.save to ``path`` atomically: a reader sees the old file or the complete new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes the file 0600; a checkpoint gets the usual mode
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(iteration, path) of the run's checkpoints, oldest first."""
    d = Path(run_dir) / "checkpoints"
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := PATTERN.match(p.name))]
    return sorted(found)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def remove_stale_tmp(run_dir: str | Path) -> list[Path]:
    """Delete the temporary files that killed checkpoint writes left in ``<run_dir>/checkpoints``.

    Only files named like :func:`atomic_save`'s checkpoint temporaries (:data:`TMP_PATTERN`) in that folder are
    touched; those whose writer process (the pid in the name) is still alive are kept. Returns the removed paths.
    """
    d = Path(run_dir) / "checkpoints"
    if not d.is_dir():
        return []
    removed, freed = [], 0
    for p in sorted(d.iterdir()):
        m = TMP_PATTERN.match(p.name)
        if not m or not p.is_file() or p.is_symlink():
            continue
        pid = int(m.group(1)) if m.group(1) else None
        if pid is not None and pid != os.getpid() and _alive(pid):
            continue
        try:
            freed += p.stat().st_size
            p.unlink()
        except FileNotFoundError:
            continue
        removed.append(p)
    if removed:
        logger.info("removed %d stale temporary checkpoint file(s) of interrupted writes in %s (%.1f MiB)",
                    len(removed), d, freed / 2**20)
    return removed


def find_resumable(run_dir: str | Path, map_location="cpu", quarantine: bool = False) -> tuple[Path, dict] | None:
    """The newest checkpoint of ``run_dir`` that loads and holds a trainer state, as (path, state); None if the run
    has no checkpoint. Unreadable ones (truncated, corrupt, not a trainer checkpoint) are skipped with a warning
    that names the file and the reason; with ``quarantine`` the skipped files newer than the one resumed from are
    renamed ``<name>.corrupt`` (kept for inspection, no longer counted by ``keep_ckpts`` or found by a resume).

    Raises:
        RuntimeError: the run has checkpoints but none of them loads (lists them and why).
    """
    found = list_checkpoints(run_dir)
    skipped, bad = [], []
    for _, path in reversed(found):
        try:
            state = load_checkpoint(path, map_location=map_location)
            missing = [k for k in REQUIRED_KEYS if k not in state] if isinstance(state, dict) else list(REQUIRED_KEYS)
            if missing:
                raise CheckpointError(f"checkpoint {path} is not a trainer checkpoint (no {', '.join(missing)})")
        except (RuntimeError, OSError) as err:
            logger.warning("resume: skipping %s: %s", path, err)
            skipped.append(f"{path.name}: {err}")
            bad.append(path)
            continue
        if skipped:
            logger.warning("resume: skipped %d unreadable newer checkpoint(s); resuming from %s", len(skipped), path)
        if quarantine:
            for b in bad:
                try:
                    b.rename(b.with_name(b.name + ".corrupt"))
                    logger.warning("resume: renamed %s to %s.corrupt", b, b.name)
                except OSError:
                    pass
        return path, state
    if skipped:
        raise CheckpointError(f"resume: none of the {len(skipped)} checkpoint(s) in {Path(run_dir) / 'checkpoints'} "
                           f"loads ({'; '.join(skipped)}); pass --resume never to start over (or another --run-dir)")
    return None


def resume_from(run_dir: str | Path, resume: str, num_classes: int, recipe: str, map_location="cpu",
                quarantine: bool = False) -> tuple[Path, dict] | None:
    """The checkpoint a run resumes from, as (path, state), checked against the run; None to start afresh.

    Args:
        run_dir: the run directory.
        resume: ``"auto"`` (the newest readable checkpoint of ``run_dir``, see :func:`find_resumable`), ``"never"``,
            or the path of a checkpoint.
        num_classes: the dataset's foreground classes; recipe: the config's recipe (checkpoints written before
            recipes existed are ``tscd``'s).
        map_location, quarantine: as :func:`find_resumable`.

    Raises:
        CheckpointError: unreadable, or trained on another number of classes or with another recipe.
    """
    if resume == "never":
        return None
    if resume == "auto":
        found = find_resumable(run_dir, map_location=map_location, quarantine=quarantine)
        if found is None:
            return None
        path, state = found
    else:
        path = Path(resume)
        state = load_checkpoint(path, map_location=map_location)
    if state.get("num_classes") != num_classes:
        raise CheckpointError(f"checkpoint {path} has {state.get('num_classes')} classes; the dataset has "
                              f"{num_classes} (another run's checkpoint? use another --run-dir or --resume never)")
    trained = (state.get("config") or {}).get("recipe", "tscd")
    if trained != recipe:
        raise CheckpointError(f"checkpoint {path} was trained with recipe {trained!r}; this config's recipe is "
                              f"{recipe!r} (use another --run-dir, --resume never, or recipe={trained})")
    return path, state


def save_checkpoint(run_dir: str | Path, iteration: int, state: dict, keep: int) -> Path:
    path = Path(run_dir) / "checkpoints" / f"ckpt_{iteration:07d}.pt"
    atomic_save(state, path)
    for _, old in list_checkpoints(run_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)  # no arbitrary unpickling
    except Exception as err:
        raise CheckpointError(f"checkpoint {path} is unreadable or corrupt ({type(err).__name__}: {err})") from None


def rng_state() -> dict:
    """Every RNG's state as tensors and plain values, so checkpoints load with ``weights_only=True``."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
