"""Writing predictions and results: palette PNGs, colour overlays, CAM heat maps, results tables (JSON / CSV).

Every file is written atomically (temporary file, then rename), so an interrupted run never leaves a truncated PNG
behind and resumable commands can trust that an existing output is complete.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from tscd.data.classes import PALETTE
from tscd.data.io import save_mask

__all__ = ["cam_heatmap", "colour_overlay", "format_table", "save_mask", "save_rgb", "unique_stem", "write_results"]


def save_rgb(arr: np.ndarray, path: str | os.PathLike) -> None:
    """Write a uint8 (H, W, 3) image as PNG, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    Image.fromarray(np.ascontiguousarray(arr, dtype=np.uint8), mode="RGB").save(tmp, format="PNG")
    os.replace(tmp, path)


def colour_overlay(image: np.ndarray, label: np.ndarray, alpha: float = 0.5,
                   palette: Sequence[int] = PALETTE) -> np.ndarray:
    """Blend the palette colours of ``label`` (H, W) into ``image`` (H, W, 3) uint8; background (0) stays as is."""
    colours = np.asarray(palette[:768], dtype=np.float32).reshape(-1, 3)[label.astype(np.int64)]
    out = image.astype(np.float32)
    fg = (label != 0)[..., None]
    out = np.where(fg, (1 - alpha) * out + alpha * colours, out)
    return out.clip(0, 255).astype(np.uint8)


def _jet(x: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> the classic 'jet' colour map, float RGB in [0, 1]."""
    r = np.clip(1.5 - np.abs(4 * x - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * x - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * x - 1), 0, 1)
    return np.stack([r, g, b], axis=-1)


def cam_heatmap(image: np.ndarray, cam: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend a CAM (H, W) in [0, 1] as a jet heat map into ``image`` (H, W, 3) uint8."""
    heat = _jet(np.clip(cam, 0, 1)) * 255
    return ((1 - alpha) * image.astype(np.float32) + alpha * heat).clip(0, 255).astype(np.uint8)


def _fmt(v: float | None) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"


def format_table(results: dict[str, dict], titles: dict[str, str] | None = None) -> str:
    """A text table: one column per evaluated output, rows mIoU, pixel acc, mean acc and per-class IoU (in %)."""
    keys = list(results)
    titles = titles or {}
    heads = [titles.get(k, k) for k in keys]
    names = list(next(iter(results.values()))["iou"]) if keys else []
    rows = [("mIoU", [_fmt(results[k]["miou"]) for k in keys]),
            ("pixel acc", [_fmt(results[k]["pixel_acc"]) for k in keys]),
            ("mean acc", [_fmt(results[k]["mean_acc"]) for k in keys])]
    rows += [(n, [_fmt(results[k]["iou"][n]) for k in keys]) for n in names]
    first = max([len("") + 10] + [len(r[0]) for r in rows])
    widths = [max(len(h), 6) for h in heads]
    lines = [" " * first + "  " + "  ".join(h.rjust(w) for h, w in zip(heads, widths))]
    for i, (name, vals) in enumerate(rows):
        lines.append(name.ljust(first) + "  " + "  ".join(v.rjust(w) for v, w in zip(vals, widths)))
        if i == 2:
            lines.append("-" * len(lines[0]))
    return "\n".join(lines)


def _atomic_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def unique_stem(out_dir: str | os.PathLike, stem: str) -> str:
    """``stem`` if neither ``<stem>.json`` nor ``<stem>.csv`` exists in ``out_dir``, else the first free
    ``<stem>.2``, ``<stem>.3``, ...: an earlier result is never overwritten silently."""
    out_dir = Path(out_dir)

    def taken(s: str) -> bool:
        return (out_dir / f"{s}.json").exists() or (out_dir / f"{s}.csv").exists()

    if not taken(stem):
        return stem
    n = 2
    while taken(f"{stem}.{n}"):
        n += 1
    return f"{stem}.{n}"


def write_results(out_dir: str | os.PathLike, report: dict, stem: str = "results") -> tuple[Path, Path]:
    """Write ``report`` (with a ``results`` mapping output -> scores) as ``<stem>.json`` and ``<stem>.csv``.

    The CSV has one row per metric (miou, pixel_acc, mean_acc, iou/<class>) and one column per output.

    Returns:
        (json path, csv path).
    """
    out_dir = Path(out_dir)
    json_path, csv_path = out_dir / f"{stem}.json", out_dir / f"{stem}.csv"
    _atomic_text(json_path, json.dumps(report, indent=2, allow_nan=True) + "\n")
    results = report["results"]
    keys = list(results)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["metric"] + keys)
    for metric in ("miou", "pixel_acc", "mean_acc"):
        writer.writerow([metric] + [_csv(results[k][metric]) for k in keys])
    names = list(results[keys[0]]["iou"]) if keys else []
    for n in names:
        writer.writerow([f"iou/{n}"] + [_csv(results[k]["iou"][n]) for k in keys])
    _atomic_text(csv_path, buf.getvalue())
    return json_path, csv_path


def _csv(v: float | None) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"
