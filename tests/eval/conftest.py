"""Fixtures for the evaluation tests: a tiny checkpoint and small datasets written by the tests (nothing downloaded)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tscd.config import load_config
from tscd.data.classes import DEMO_CLASSES
from tscd.data.demo import DemoDataset
from tscd.data.io import classes_in_mask, save_mask, write_cls_labels, write_split_list
from tscd.models import create_model

NUM_CLASSES = 5
#: Non-square, odd-sized images (h, w) of the on-disk test set.
ODD_SIZES = ((41, 57), (57, 39), (45, 45))


def save_checkpoint(path, num_classes: int = NUM_CLASSES, seed: int = 0) -> None:
    """A checkpoint shaped like the trainer's, of a randomly initialised tiny model."""
    torch.manual_seed(seed)
    model = create_model("tscd_mit_tiny", num_classes=num_classes, decoder_dim=32)
    cfg = load_config(None, ["data.dataset=demo", "model.name=tscd_mit_tiny", "model.decoder_dim=32",
                             "data.demo_size=64", "data.demo_num_val=3", "data.demo_num_train=3"])
    torch.save({"model": model.state_dict(), "config": cfg.to_dict(), "num_classes": num_classes, "iteration": 7},
               path)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "run" / "checkpoints" / "ckpt_0000007.pt"
    path.parent.mkdir(parents=True)
    save_checkpoint(path)
    return path


@pytest.fixture(scope="session")
def odd_root(tmp_path_factory):
    """A VOC-layout folder with the demo classes and non-square, odd-sized images (split ``val``)."""
    root = tmp_path_factory.mktemp("odd")
    src = DemoDataset("val", num_images=len(ODD_SIZES), size=64)
    labels, ids = {}, []
    for i, (h, w) in enumerate(ODD_SIZES):
        img, mask, _ = src.load_raw(i)
        img, mask = img[:h, :w], mask[:h, :w].copy()
        mask[0, :5] = 255  # some ignore pixels
        name = f"odd_{i}"
        (root / "JPEGImages").mkdir(exist_ok=True)
        Image.fromarray(img).save(root / "JPEGImages" / f"{name}.png")
        save_mask(mask, root / "SegmentationClassAug" / f"{name}.png")
        cls = classes_in_mask(np.where(mask == 255, 0, mask).astype(np.uint8), NUM_CLASSES)
        if not cls.any():  # keep every image with at least one class
            mask[h // 2, w // 2] = 1
            save_mask(mask, root / "SegmentationClassAug" / f"{name}.png")
            cls = classes_in_mask(mask, NUM_CLASSES)
        labels[name] = [int(k) + 1 for k in np.flatnonzero(cls)]
        ids.append(name)
    write_split_list(root / "splits" / "val.txt", ids)
    write_cls_labels(root / "cls_labels.json", DEMO_CLASSES, labels)
    return root
