"""TSCD training: the loop (``Trainer``), losses, schedule, checkpoints (labels: :mod:`tscd.method`)."""
from tscd.train.trainer import Trainer

__all__ = ["Trainer"]
