"""Arguments several commands share: the checkpoint and the data it is run on (``eval``, ``infer``,
``pseudo-labels``), and lists of scales."""
from __future__ import annotations

import argparse


def parse_scales(text: str) -> tuple[float, ...]:
    """``"1,0.5,0.75"`` -> (1.0, 0.5, 0.75); an argparse type."""
    try:
        scales = tuple(float(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive numbers, e.g. 1,0.5,0.75; got {text!r}")
    if not scales or any(s <= 0 for s in scales):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive numbers, e.g. 1,0.5,0.75; got {text!r}")
    return scales


def add_checkpoint_args(p: argparse.ArgumentParser, split_default: str | None = None) -> None:
    """``--checkpoint`` and ``--device``; with ``split_default`` (the config key the split defaults to) also
    ``--split``, ``--dataset`` and ``--root`` (the data the checkpoint is run on; default: its config's)."""
    p.add_argument("--checkpoint", required=True, help="checkpoint file (runs/<name>/checkpoints/ckpt_*.pt)")
    if split_default is not None:
        p.add_argument("--split", default=None, help=f"split (default: the config's {split_default})")
        p.add_argument("--dataset", default=None, help="dataset name (default: the checkpoint's data.dataset)")
        p.add_argument("--root", default=None, help="dataset root (default: the checkpoint's data.root)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")


def load_checkpoint_model(args: argparse.Namespace):
    """The device (``--device``) and :func:`tscd.eval.inference.load_model` of ``--checkpoint`` (config overrides
    of the command line applied). On the CPU the config's ``train.host_memory`` applies to this process as it does
    to training (``reuse``: glibc keeps freed memory instead of faulting large blocks in afresh per image)."""
    from tscd.eval.inference import load_model, resolve_device
    from tscd.train.host_memory import apply_host_memory

    device = resolve_device(args.device)
    loaded = load_model(args.checkpoint, device, args.overrides or [])
    apply_host_memory(loaded.config.train.host_memory, device)
    return device, loaded
