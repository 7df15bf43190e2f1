"""Constants shared by the whole package (defined once, imported everywhere)."""

#: Label value of pixels that no loss and no metric looks at (VOC's border value).
IGNORE_INDEX: int = 255

#: ImageNet normalisation on the 0..255 scale (docs/method.md 5).
IMAGENET_MEAN: tuple[float, float, float] = (123.675, 116.28, 103.53)
IMAGENET_STD: tuple[float, float, float] = (58.395, 57.12, 57.375)

#: Evaluation protocols of ``tscd eval`` (tscd.eval.evaluator): name -> description. Here, not there, so that
#: building the command line's parser imports no torch.
EVAL_PROTOCOLS: dict[str, str] = {
    "native": "native image size, seg single-scale, multi-scale+flip CAM (what training validation reports)",
    "ms": "long side 512, seg multi-scale 1,0.5,0.75 + flip (the field's test protocol)",
}
