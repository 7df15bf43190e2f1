"""Small datasets written by the tests themselves (nothing is downloaded)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from tscd.data.classes import COCO_CATEGORY_IDS, COCO_CLASSES, PALETTE


def write_image(path: Path, h: int, w: int, seed: int = 0, mode: str = "RGB") -> np.ndarray:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(arr)
    if mode != "RGB":
        im = im.convert(mode)
    im.save(path)
    return arr


def write_mask(path: Path, mask: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(mask.astype(np.uint8), mode="P")
    im.putpalette(list(PALETTE))
    im.save(path)


def make_mask(h: int, w: int, classes: list[int], border: bool = True) -> np.ndarray:
    mask = np.zeros((h, w), dtype=np.uint8)
    for k, c in enumerate(classes):
        y0, x0 = 2 + 3 * k, 2 + 4 * k
        mask[y0:y0 + 6, x0:x0 + 6] = c
        if border:
            mask[y0 - 1, x0:x0 + 6] = 255
    return mask


#: id -> (h, w, classes)
VOC_ITEMS = {
    "2007_000001": (20, 30, [1, 15]),
    "2007_000002": (24, 24, [7]),
    "2007_000003": (18, 26, [20]),
    "2008_000004": (22, 28, [3, 12]),
    "2008_000005": (20, 20, [15]),
    "2009_000006": (26, 22, [2, 5, 9]),
}
VOC_TRAIN = ["2007_000001", "2007_000002"]
VOC_VAL = ["2008_000004", "2008_000005"]


def make_voc(root: Path, items: dict | None = None, official: bool = True) -> Path:
    """A mini VOC2012 tree: JPEG images, SegmentationClassAug palette masks, official train/val lists."""
    items = VOC_ITEMS if items is None else items
    for k, (name, (h, w, classes)) in enumerate(items.items()):
        write_image(root / "JPEGImages" / f"{name}.jpg", h, w, seed=k)
        write_mask(root / "SegmentationClassAug" / f"{name}.png", make_mask(h, w, classes))
    if official:
        seg = root / "ImageSets" / "Segmentation"
        seg.mkdir(parents=True, exist_ok=True)
        (seg / "train.txt").write_text("\n".join(VOC_TRAIN) + "\n")
        (seg / "val.txt").write_text("\n".join(VOC_VAL) + "\n")
    return root


def rect_polygon(x0, y0, x1, y1):
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def uncompressed_rle(binary):
    """COCO's uncompressed RLE: column-major run lengths, starting with a run of zeros."""
    flat = np.asfortranarray(binary).reshape(-1, order="F")
    counts, current, run = [], 0, 0
    for v in flat:
        if v != current:
            counts.append(run)
            current, run = v, 0
        run += 1
    counts.append(run)
    return {"size": list(binary.shape), "counts": [int(c) for c in counts]}


def compressed_rle(binary):
    from pycocotools import mask as mask_utils  # here, not at the top: collecting the suite must not need it

    rle = mask_utils.encode(np.asfortranarray(binary.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def box_mask(h, w, y0, y1, x0, x1):
    m = np.zeros((h, w), dtype=np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


def make_coco(root, split="train"):
    """Synthetic instances JSON + images: polygon, both RLE kinds, crowd, overlap, no annotations, crowd only."""
    y = f"{split}2014"
    names = {i: f"COCO_{y}_{i:012d}.jpg" for i in (1, 2, 3, 4)}
    sizes = {1: (40, 50), 2: (30, 30), 3: (20, 20), 4: (20, 24)}
    images = [{"id": i, "file_name": names[i], "height": sizes[i][0], "width": sizes[i][1]} for i in names]
    for i in names:
        write_image(root / y / names[i], *sizes[i], seed=i)
    anns = [
        # image 1: a small dog listed before the large person it lies on; a crowd region partly under the person
        {"id": 10, "image_id": 1, "category_id": 18, "iscrowd": 0, "segmentation": rect_polygon(10, 10, 20, 20)},
        {"id": 11, "image_id": 1, "category_id": 1, "iscrowd": 0, "segmentation": rect_polygon(5, 5, 45, 35)},
        {"id": 12, "image_id": 1, "category_id": 1, "iscrowd": 1,
         "segmentation": uncompressed_rle(box_mask(40, 50, 32, 40, 0, 50))},
        # image 2: compressed RLE of category 90 (toothbrush, class 80) and a car polygon
        {"id": 20, "image_id": 2, "category_id": 90, "iscrowd": 0,
         "segmentation": compressed_rle(box_mask(30, 30, 2, 12, 2, 12))},
        {"id": 21, "image_id": 2, "category_id": 3, "iscrowd": 0, "segmentation": rect_polygon(15, 15, 28, 28)},
        # image 3: nothing; image 4: crowd only
        {"id": 40, "image_id": 4, "category_id": 62, "iscrowd": 1,
         "segmentation": uncompressed_rle(box_mask(20, 24, 0, 10, 0, 10))},
    ]
    cats = [{"id": c, "name": n} for c, n in zip(COCO_CATEGORY_IDS, COCO_CLASSES[1:])]
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / f"instances_{y}.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return names
