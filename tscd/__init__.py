"""tscd: end-to-end weakly-supervised semantic segmentation (TSCD / AFA) with fused kernels.

Subpackages:
    tscd.kernels  fused ops (refine, correlation_loss, ...) with backend= dispatch
    tscd.models   MiT encoder, SegFormer head, TSCD network
    tscd.data     datasets (VOC, COCO, custom folders, the generated demo set) and transforms
    tscd.method   the label logic shared by training and evaluation (pseudo labels, random walk)
    tscd.train    the training loop
    tscd.eval     evaluation and inference
"""
from tscd.constants import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD

__version__ = "0.1.0"

__all__ = ["IGNORE_INDEX", "IMAGENET_MEAN", "IMAGENET_STD", "__version__"]
