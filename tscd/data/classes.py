"""Class names and colour palettes of the supported datasets (facts, written out once).

Every list of class names here has the background first, so index ``k`` of the list is the value
``k`` in a mask and foreground class ``k`` (1-based) is entry ``k - 1`` of a multi-hot class vector.
"""
from __future__ import annotations

#: PASCAL VOC 2012: background + 20 classes, in the standard order (mask values 0..20).
VOC_CLASSES: tuple[str, ...] = (
    "background",
    "aeroplane", "bicycle", "bird", "boat", "bottle",
    "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person",
    "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)

#: COCO 2014/2017 instances: background + 80 "thing" classes, in the order of their category ids.
COCO_CLASSES: tuple[str, ...] = (
    "background",
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)

#: The 80 COCO category ids (1..90 with gaps), in the order of ``COCO_CLASSES[1:]``.
COCO_CATEGORY_IDS: tuple[int, ...] = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28,
    31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55,
    56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84,
    85, 86, 87, 88, 89, 90,
)

#: COCO category id (1..90) -> contiguous class index (1..80).
COCO_ID_TO_CLASS: dict[int, int] = {cat_id: k + 1 for k, cat_id in enumerate(COCO_CATEGORY_IDS)}

#: The procedurally generated demo set (:mod:`tscd.data.demo`): background + 5 shapes.
DEMO_CLASSES: tuple[str, ...] = ("background", "disc", "square", "triangle", "ring", "cross")


def make_palette(num_entries: int = 256) -> list[int]:
    """The PASCAL VOC colour map (bit-interleaved), flattened to ``[r0, g0, b0, r1, ...]``.

    Entry 0 is black, 1..20 are the VOC class colours, 255 (ignore) is (224, 224, 192). The same map
    is used for COCO, the demo set and custom data, so any number of classes up to 254 gets
    distinct colours.

    Args:
        num_entries: how many colours (256 for a PIL "P"-mode palette).

    Returns:
        A list of ``3 * num_entries`` ints in 0..255, ready for ``PIL.Image.putpalette``.
    """
    palette = []
    for index in range(num_entries):
        r = g = b = 0
        c = index
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        palette.extend((r, g, b))
    return palette


#: The 256-entry palette used for every mask PNG this package writes.
PALETTE: tuple[int, ...] = tuple(make_palette(256))
