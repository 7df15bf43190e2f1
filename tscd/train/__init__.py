"""TSCD training: the loop (``Trainer``), pseudo labels, losses, schedule, checkpoints."""
from tscd.train.pseudo_labels import cam_to_label, refine_cams_with_bkg
from tscd.train.trainer import Trainer

__all__ = ["Trainer", "cam_to_label", "refine_cams_with_bkg"]
