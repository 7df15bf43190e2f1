"""Constants shared by the whole package (defined once, imported everywhere)."""

#: Label value of pixels that no loss and no metric looks at (VOC's border value).
IGNORE_INDEX: int = 255

#: ImageNet normalisation on the 0..255 scale (docs/method.md 5).
IMAGENET_MEAN: tuple[float, float, float] = (123.675, 116.28, 103.53)
IMAGENET_STD: tuple[float, float, float] = (58.395, 57.12, 57.375)
