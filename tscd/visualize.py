"""Pictures of a run: a grid of validation images and the training curves (PNG, matplotlib).

* :func:`save_grid` draws one row per image: image | CAM | pseudo label | prediction | ground truth,
  with the palette legend (class names) underneath. The CAM column is the highest CAM of the
  classes present in the image, as a heat map over the image; pseudo labels show their uncertain
  pixels (255, ignored by the loss) in white.
* :func:`save_curves` draws each loss term, the learning rate and the validation mIoU of the
  segmentation head, the CAM label and the pseudo labels against the iteration (the validation records of the
  run's ``metrics.jsonl``, :func:`tscd.eval.metrics.read_metrics`).
* :func:`write_run_pictures` does both for a :class:`~tscd.train.trainer.Trainer` at the end of
  training (``train.plots``): ``<run_dir>/val_grid.png`` and ``<run_dir>/curves.png``.

Training and the ``eval`` / ``infer`` commands import this module; it imports nothing of :mod:`tscd.train`.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tscd.constants import IGNORE_INDEX

logger = logging.getLogger(__name__)

GRID_COLUMNS: tuple[str, ...] = ("image", "CAM", "pseudo label", "prediction", "ground truth")
#: The row keys of :func:`save_grid`, in the order of ``GRID_COLUMNS``.
GRID_KEYS: tuple[str, ...] = ("image", "cam", "pseudo", "pred", "gt")
LOSS_KEYS: tuple[str, ...] = ("cls", "seg", "aff", "reg", "scd", "er")
UNCERTAIN_RGB = (255, 255, 255)


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def colorize(label: np.ndarray, palette: Sequence[int]) -> np.ndarray:
    """(H, W) class ids -> (H, W, 3) uint8 with the dataset palette; 255 (uncertain/ignored) is white."""
    label = np.asarray(label)
    pal = np.zeros((256, 3), dtype=np.uint8)
    flat = np.asarray(list(palette)[:768], dtype=np.uint8).reshape(-1, 3)
    pal[:len(flat)] = flat
    pal[IGNORE_INDEX] = UNCERTAIN_RGB
    if label.min(initial=0) < 0 or label.max(initial=0) > 255:
        raise ValueError(f"colorize: labels must be in 0..255; got {label.min()}..{label.max()}")
    return pal[label.astype(np.int64)]


def save_grid(path: str | Path, rows: Sequence[dict], class_names: Sequence[str], palette: Sequence[int],
              title: str | None = None, cell_inches: float = 1.5, dpi: int = 80) -> Path:
    """Write the validation grid PNG: one row per image, the columns of :data:`GRID_COLUMNS` its rows have.

    Args:
        path: output file (``.png``).
        rows: one dict per image with ``image`` (H, W, 3) uint8 and ``pred`` (H, W) int class ids, and any of
            ``cam`` ((H, W) float in [0, 1], drawn as a jet heat map over the image, or an (H, W, 3) uint8
            picture drawn as it is), ``pseudo`` and ``gt`` ((H, W) class ids; 255: uncertain / ignored).
            Every row must have the same keys (``tscd infer`` has no pseudo label or ground truth).
        class_names: names of classes 0..K (0 = background), shown in the legend.
        palette: flat RGB palette (the dataset's).
        title: optional figure title.

    Returns:
        The path written.
    """
    if not rows:
        raise ValueError("save_grid: no rows to draw")
    keys = [k for k in GRID_KEYS if k in rows[0]]
    for i, r in enumerate(rows):
        missing = {"image", "pred"} - set(r)
        if missing:
            raise ValueError(f"save_grid: row {i} lacks {sorted(missing)}")
        if [k for k in GRID_KEYS if k in r] != keys:
            raise ValueError(f"save_grid: row {i} has columns {sorted(set(r) & set(GRID_KEYS))}, row 0 {sorted(keys)}")
    titles = [GRID_COLUMNS[GRID_KEYS.index(k)] for k in keys]
    plt = _plt()
    from matplotlib.patches import Patch

    n = len(rows)
    legend_h = 0.35 * (1 + (len(class_names) + 1) // 4)
    fig, axes = plt.subplots(n, len(keys), squeeze=False,
                             figsize=(cell_inches * max(len(keys), 3), cell_inches * n + legend_h + 0.3))

    def cell(r: dict, key: str) -> np.ndarray:
        if key == "image":
            return r["image"]
        if key == "cam":
            cam = np.asarray(r["cam"])
            if cam.ndim == 3:  # already a picture (tscd infer's cam/<name>.png)
                return cam
            heat = plt.get_cmap("jet")(np.clip(cam.astype(np.float32), 0, 1))[..., :3]
            return (0.5 * np.asarray(r["image"], dtype=np.float32) / 255.0 + 0.5 * heat).clip(0, 1)
        return colorize(r[key], palette)

    for i, r in enumerate(rows):
        for j, key in enumerate(keys):
            ax = axes[i][j]
            ax.imshow(cell(r, key), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(titles[j], fontsize=9)
    pal = np.asarray(list(palette)[:3 * len(class_names)], dtype=np.float32).reshape(-1, 3) / 255.0
    handles = [Patch(facecolor=pal[k], edgecolor="black", label=name) for k, name in enumerate(class_names)]
    handles.append(Patch(facecolor=np.asarray(UNCERTAIN_RGB) / 255.0, edgecolor="black", label="uncertain (255)"))
    fig.legend(handles=handles, loc="lower center", ncol=min(4, len(handles)), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, legend_h / fig.get_figheight(), 1, 0.97 if title else 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def save_curves(path: str | Path, history: Sequence[dict], val_points: Sequence[dict] = (),
                title: str | None = None, dpi: int = 80) -> Path:
    """Write the training-curve PNG: loss terms, learning rate, validation mIoU.

    Args:
        path: output file.
        history: the trainer's per-iteration records (``iteration``, the loss terms, ``total``, ``lr``).
        val_points: validation records of ``metrics.jsonl`` (:func:`tscd.eval.metrics.read_metrics`): their
            ``iteration`` and ``miou`` of ``seg``, ``cam`` and ``pseudo`` (in %).
        title: optional figure title.

    Returns:
        The path written.
    """
    if not history:
        raise ValueError("save_curves: empty history")
    plt = _plt()
    fig, (ax_loss, ax_lr, ax_iou) = plt.subplots(1, 3, figsize=(13, 3.6))
    its = np.asarray([h["iteration"] for h in history], dtype=np.float64)
    smooth = max(1, len(history) // 60)
    for key in (*LOSS_KEYS, "total"):
        pts = [(h["iteration"], h[key]) for h in history if key in h]
        if not pts:
            continue
        x, y = np.asarray(pts, dtype=np.float64).T
        if smooth > 1 and len(y) > smooth:  # running mean over ``smooth`` iterations
            y = np.convolve(y, np.ones(smooth) / smooth, mode="valid")
            x = x[smooth - 1:]
        ax_loss.plot(x, y, label=key, lw=1.5 if key == "total" else 1.0, ls="--" if key == "total" else "-")
    ax_loss.axhline(0.0, color="grey", lw=0.5)  # linear scale: the SCD and CRF terms are negative
    ax_loss.set_xlabel("iteration")
    ax_loss.set_title(f"loss terms (running mean of {smooth})" if smooth > 1 else "loss terms")
    ax_loss.legend(fontsize=7)
    ax_lr.plot(its, [h.get("lr", np.nan) for h in history], color="black")
    ax_lr.set_xlabel("iteration")
    ax_lr.set_title("learning rate")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    for key, label in (("seg", "segmentation head"), ("cam", "CAM label"), ("pseudo", "pseudo label")):
        pts = [(v["iteration"], v["miou"][key]) for v in val_points if v.get("miou", {}).get(key) is not None]
        if pts:
            x, y = np.asarray(pts, dtype=np.float64).T
            ax_iou.plot(x, y, marker="o", label=label)
    ax_iou.set_xlim(0, max(float(its.max()), 1.0))
    ax_iou.set_ylim(0, 100)
    ax_iou.set_xlabel("iteration")
    ax_iou.set_title("validation mIoU (%)")
    if val_points:
        ax_iou.legend(fontsize=7)
    else:
        ax_iou.text(0.5, 0.5, "not validated", ha="center", va="center", transform=ax_iou.transAxes)
    for ax in (ax_loss, ax_lr, ax_iou):
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


@torch.no_grad()
def predict_rows(net: torch.nn.Module, dataset, indices: Sequence[int], settings,
                 device: torch.device | str = "cpu") -> list[dict]:
    """Run the network on dataset items as :func:`tscd.eval.evaluator.evaluate` scores them: the rows
    :func:`save_grid` draws.

    Args:
        net: a TSCDNet.
        dataset: items with ``img``, ``label`` and ``cls_label``.
        indices: which items.
        settings: :class:`tscd.eval.evaluator.EvalSettings` (``protocol_settings(...)``): resize, CAM scales,
            flip, CAM background threshold and the VARM options; the CAM and pseudo label use the image's true
            class labels, as in evaluation.
        device: where to run.
    """
    from tscd.data import denormalize
    from tscd.eval.inference import forward_multi_scale, resize_long
    from tscd.method.labels import refine_cams_with_bkg

    was_training = net.training
    net.eval()
    rows = []
    for i in indices:
        item = dataset[i]
        if item.get("label") is None:
            raise ValueError(f"predict_rows: item {item.get('name', i)} has no mask")
        img = item["img"].unsqueeze(0).to(device)
        cls_label = item["cls_label"].unsqueeze(0).to(device)
        size = tuple(item["label"].shape[-2:])
        out = forward_multi_scale(net, resize_long(img, settings.resize_long), seg_scales=None,
                                  cam_scales=settings.cam_scales, flip=settings.flip)
        seg = F.interpolate(out.seg_logits.float(), size=size, mode="bilinear", align_corners=False)
        cams = F.interpolate(out.cam.float(), size=size, mode="bilinear", align_corners=False)
        img01 = denormalize(img.float())
        pseudo = refine_cams_with_bkg(img01, cams, cls_label, None, **settings.pseudo)
        present = cls_label[0] > 0.5
        heat = cams[0][present].amax(0) if bool(present.any()) else torch.zeros(size, device=cams.device)
        rows.append({
            "image": (img01[0].permute(1, 2, 0).cpu().numpy() * 255.0).round().clip(0, 255).astype(np.uint8),
            "cam": heat.cpu().numpy(),
            "pseudo": pseudo[0].cpu().numpy(),
            "pred": seg[0].argmax(0).cpu().numpy(),
            "gt": item["label"].cpu().numpy(),
        })
    net.train(was_training)
    return rows


def eval_grid(net: torch.nn.Module, dataset, settings, device, path: str | Path, num_images: int,
              title: str | None = None) -> Path:
    """``tscd eval --grid N``: the grid of the first ``num_images`` images of an evaluation dataset (with masks),
    drawn with the evaluation's settings (resize, CAM scales, flip, VARM options)."""
    if num_images < 1:
        raise ValueError(f"`--grid` must be >= 1 (images in the picture); got {num_images}")
    n = min(num_images, len(dataset))
    rows = predict_rows(net, dataset, range(n), settings, device)
    return save_grid(path, rows, dataset.class_names, dataset.palette, title=title)


def class_names_for(dataset: str, num_classes: int) -> list[str]:
    """Legend names of a dataset known by name (voc, coco, demo) with ``num_classes`` foreground classes;
    ``class k`` for any other (a custom folder's names are not stored in the checkpoint)."""
    from tscd.data.classes import COCO_CLASSES, DEMO_CLASSES, VOC_CLASSES

    known = {"voc": VOC_CLASSES, "coco": COCO_CLASSES, "demo": DEMO_CLASSES}.get(dataset)
    if known is not None and len(known) == num_classes + 1:
        return list(known)
    return ["background", *(f"class {k}" for k in range(1, num_classes + 1))]


def infer_grid(image_paths: Sequence[str | Path], out_dir: str | Path, class_names: Sequence[str],
               num_images: int, cam: bool = False, title: str | None = None) -> Path:
    """``tscd infer --grid N``: ``<out>/grid.png`` of the first ``num_images`` inputs from what infer wrote:
    image | CAM heat map (with ``--cam``) | prediction. No pseudo label or ground truth (infer has no labels)."""
    from PIL import Image

    from tscd.data.classes import PALETTE
    from tscd.data.io import load_image

    if num_images < 1:
        raise ValueError(f"`--grid` must be >= 1 (images in the picture); got {num_images}")
    out_dir = Path(out_dir)
    rows = []
    for path in list(image_paths)[:num_images]:
        stem = Path(path).stem
        row = {"image": load_image(path), "pred": np.asarray(Image.open(out_dir / f"{stem}.png"))}
        if cam:
            row["cam"] = np.asarray(Image.open(out_dir / "cam" / f"{stem}.png").convert("RGB"))
        rows.append(row)
    return save_grid(out_dir / "grid.png", rows, class_names, PALETTE, title=title)


def tensorboard_images(writer, images: dict[str, torch.Tensor], palette: Sequence[int], iteration: int) -> None:
    """A recipe's pictures of its last micro-batch (:meth:`tscd.method.recipes.Recipe.images`) to TensorBoard:
    the image, the highest CAM, the pseudo label and the prediction (labels in the palette's colours)."""
    pal = torch.tensor(list(palette)[:768], dtype=torch.uint8).view(-1, 3)

    def colour(label: torch.Tensor) -> torch.Tensor:
        return pal[label[0].cpu().clamp(max=255).long()].permute(2, 0, 1)

    if "img01" in images:
        writer.add_image("train/image", images["img01"][0].cpu(), iteration)
    if "cam" in images:
        writer.add_image("train/cam_max", images["cam"][0].max(0, keepdim=True)[0].cpu(), iteration)
    for key, tag in (("pseudo", "train/pseudo_label"), ("pred", "train/prediction")):
        if key in images:
            writer.add_image(tag, colour(images[key]), iteration)


def write_run_pictures(trainer, num_images: int = 6) -> dict[str, Path]:
    """``<run_dir>/val_grid.png`` (first ``num_images`` val images) and ``<run_dir>/curves.png``.

    Returns:
        ``{"grid": path, "curves": path}`` (``curves`` is absent when there is no history).
    """
    run_dir = Path(trainer.run_dir)
    ds = trainer.val_set
    n = min(num_images, len(ds))
    cfg = trainer.cfg
    from tscd.eval.evaluator import protocol_settings
    from tscd.eval.metrics import read_metrics

    settings = protocol_settings("native", cfg, trainer.device, cfg.data.val_split, outputs=("seg", "cam", "pseudo"),
                                 num_images=n)
    rows = predict_rows(trainer.net, ds, range(n), settings, trainer.device)
    it = trainer.iteration
    paths = {"grid": save_grid(run_dir / "val_grid.png", rows, ds.class_names, ds.palette,
                               title=f"{cfg.data.dataset} {cfg.data.val_split}, iteration {it}")}
    if trainer.history:
        paths["curves"] = save_curves(run_dir / "curves.png", trainer.history, read_metrics(run_dir, "native"),
                                      title=f"{cfg.data.dataset}, {cfg.recipe}, {cfg.model.name}")
    for k, p in paths.items():
        logger.info("%s picture: %s", k, p)
    return paths
