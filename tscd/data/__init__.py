"""Datasets, transforms and loaders (docs/method.md 5): PASCAL VOC, COCO 2014, custom folders, a generated demo set.

The interface the trainer and evaluator rely on
-----------------------------------------------
Every dataset is a ``torch.utils.data.Dataset``; item ``i`` is a dict:

==============  ===============  ==========================================================================
key             type             meaning
==============  ===============  ==========================================================================
``name``        str              image id (file stem)
``img``         float32 (3,H,W)  ImageNet-normalised image (``(x - mean) / std`` on the 0..255 scale)
``cls_label``   float32 (C,)     multi-hot over the C foreground classes (class k -> position k - 1)
``label``       int64 (H,W)      mask: 0 background, 1..C classes, 255 ignore; present when the dataset
                                 has masks; for training crops it is cropped/padded with 255 in padding
``img_box``     int64 (4,)       ``[top, bottom, left, right]``: the real image inside ``img``, as
                                 ``img[:, top:bottom, left:right]`` (bottom/right exclusive); for
                                 evaluation items the full image ``[0, H, 0, W]``
``views``       dict             only with ``views="toco"`` (training): ``{"view2", "local"}``, each float32
                                 (3,crop,crop) normalised; ToCo's extra views (:mod:`tscd.data.views`);
                                 the default collate stacks them to ``batch["views"][name]`` (B,3,crop,crop)
==============  ===============  ==========================================================================

Training items are ``crop x crop`` (random rescale ``U(0.5, 2)``, horizontal flip, padding with raw
0 (black, the official canvas; ``data.pad_value``), random crop); evaluation items keep their native size (batch 1).
Datasets expose ``num_classes`` (C, foreground only), ``class_names`` (C + 1 names, ``"background"``
first) and ``palette`` (768 ints for ``PIL.Image.putpalette``; index 255 is the ignore colour).

Entry points
------------
* ``build_dataset(name, split, root, train, crop_size=None, *, skip_bad=False, scale_range=(0.5, 2.0),
  flip_prob=0.5, img_pad_value=None, views=None, **kwargs)`` for ``name`` in ``voc``, ``coco``, ``custom``,
  ``demo`` (``root=None`` with ``demo`` generates the data in memory); ``views="toco"`` adds ToCo's views
  (:class:`~tscd.data.views.ToCoTrainTransform`, needs torchvision).
* ``build_loader(dataset, batch_size, shuffle, num_workers=0, seed=0, drop_last=False,
  distributed=False)``: augmentation randomness per item from (seed, epoch, index), identical for
  any number of workers, never repeated across workers; ``DistributedSampler`` when distributed;
  ``loader.sampler.set_epoch(e)`` sets the epoch (it otherwise counts passes).
* ``denormalize(img) -> [0, 1]`` (for VARM/PAR), ``normalize(img_uint8_hwc)``.

Preparing data (one command per dataset)
----------------------------------------
* VOC 2012 + SBD: ``tscd data voc --root VOCdevkit/VOC2012`` writes ``splits/{train_aug,train,val}.txt``
  and ``cls_labels.json`` and checks the tree (:mod:`tscd.data.voc`).
* COCO 2014: ``tscd data coco --root COCO --workers 8`` renders masks to ``SegmentationClass/`` and
  writes lists and class vectors (:mod:`tscd.data.coco`).
* Custom: ``root/images/``, ``root/labels.csv`` (``image_id,class1;class2``) or ``labels.json``, optional
  ``root/masks/`` + ``root/classes.txt`` (:mod:`tscd.data.custom`); ``tscd data check --dataset custom --root DIR``.
* Demo: ``tscd data demo --out DIR`` (:mod:`tscd.data.demo`), or ``build_dataset("demo", "train", None, True)``.

Bad files raise :class:`DataError` / ``FileNotFoundError`` naming the file; ``skip_bad=True`` turns
them into counted warnings (``dataset.num_skipped``).
"""
from tscd.data.base import SegmentationDataset
from tscd.data.classes import COCO_CLASSES, DEMO_CLASSES, PALETTE, VOC_CLASSES
from tscd.data.coco import COCODataset, prepare_coco
from tscd.data.custom import CustomDataset
from tscd.data.demo import DemoDataset, write_demo
from tscd.data.factory import DATASET_NAMES, build_dataset
from tscd.data.io import DataError
from tscd.data.loader import build_loader
from tscd.data.transforms import EvalTransform, TrainTransform, denormalize, normalize
from tscd.data.views import TOCO_VIEW_NAMES, ToCoTrainTransform
from tscd.data.voc import VOCDataset, prepare_voc

__all__ = [
    "COCO_CLASSES", "DATASET_NAMES", "DEMO_CLASSES", "PALETTE", "TOCO_VIEW_NAMES", "VOC_CLASSES",
    "COCODataset", "CustomDataset", "DataError", "DemoDataset", "EvalTransform", "SegmentationDataset",
    "ToCoTrainTransform", "TrainTransform", "VOCDataset",
    "build_dataset", "build_loader", "denormalize", "normalize", "prepare_coco", "prepare_voc", "write_demo",
]
