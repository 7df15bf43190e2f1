"""Training: the loop (``Trainer``), schedule, checkpoints, the dry run (the method is a recipe:
:mod:`tscd.method.recipes`)."""
from tscd.train.trainer import Trainer

__all__ = ["Trainer"]
