"""The loss terms moved to :mod:`tscd.method.losses` (the recipes, below training, use them); kept importable here."""
from tscd.method.losses import affinity_loss, cls_loss, equivariance_loss, seg_loss

__all__ = ["affinity_loss", "cls_loss", "equivariance_loss", "seg_loss"]
