"""`tscd weights`: look at and convert MiT encoder weights from SegFormer, Hugging Face or mmsegmentation (and look
at ViT weights for ToCo: DeiT, timm, Hugging Face).

    tscd weights inspect ~/Downloads/mit-b1                 # format, variant (B0-B5), parameter count
    tscd weights inspect deit_base_patch16_224-b5f2ef4d.pth # a ViT: width, depth, patch, positional grid
    tscd weights convert ~/Downloads/mit-b1 mit_b1.pth      # write tscd's format (a plain state dict)

The format is recognised from the keys and shapes (see :mod:`tscd.models.weights`); ``model.pretrained`` reads all
of them directly, so converting is optional (it makes a smaller file that needs no conversion at start-up).
"""
from __future__ import annotations

import argparse
import json
import logging
import os

logger = logging.getLogger("tscd.weights")


def summarize(path: str) -> tuple[dict, dict]:
    """Read ``path`` and check it forms a complete MiT encoder: ``(summary, tscd state dict)``.

    Raises:
        FileNotFoundError, RuntimeError, ValueError: as :func:`tscd.models.weights.read_mit_weights`, and a
            ``ValueError`` when an encoder tensor is missing.
    """
    import torch

    from tscd.models.mit import MIT_CONFIGS, MixVisionTransformer
    from tscd.models.weights import infer_architecture, read_mit_weights

    weights = read_mit_weights(path)
    arch = infer_architecture(weights.state_dict)
    variant = arch.variant
    heads = MIT_CONFIGS[variant].get("num_heads", (1, 2, 5, 8)) if variant else (1, 1, 1, 1)  # heads hold no weights
    with torch.device("meta"):  # only the key set and shapes are needed: no memory, no init cost
        model = MixVisionTransformer(in_chans=arch.in_chans, embed_dims=arch.embed_dims, depths=arch.depths,
                                     sr_ratios=arch.sr_ratios, mlp_ratios=arch.mlp_ratios, num_heads=heads)
    try:
        weights.check(model, what=f"MiT encoder these weights describe ({variant or 'custom'})")
    except ValueError as e:
        raise ValueError(f"{weights.source!r}: {e}") from None
    summary = {
        "file": weights.source,
        "format": weights.format,
        "format_title": weights.title,
        "layout": weights.layout,
        "prefix": weights.prefix,
        "variant": variant,
        "in_chans": arch.in_chans,
        "embed_dims": list(arch.embed_dims),
        "depths": list(arch.depths),
        "sr_ratios": list(arch.sr_ratios),
        "parameters": weights.num_params(),
        "tensors": len(weights.state_dict),
        "dropped": weights.dropped,
    }
    return summary, weights.state_dict


def summarize_vit(path: str) -> tuple[dict, dict]:
    """Read ``path`` as ViT encoder weights (ToCo's backbone: DeiT, timm or Hugging Face) and check them against the
    ViT they describe: ``(summary, tscd state dict)``.

    Raises:
        FileNotFoundError, RuntimeError, ValueError: as :func:`tscd.models.vit_weights.read_vit_weights`.
    """
    import torch

    from tscd.models.vit import VIT_CONFIGS, ViTEncoder
    from tscd.models.vit_weights import read_vit_weights

    weights = read_vit_weights(path)
    sd = weights.state_dict
    dim, depth = int(sd["cls_token"].shape[-1]), len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    patch = int(sd["patch_embed.proj.weight"].shape[-1])
    variant = next((n for n, c in VIT_CONFIGS.items() if (c["embed_dim"], c["depth"], c["patch_size"]) ==
                    (dim, depth, patch)), None)
    heads = VIT_CONFIGS[variant]["num_heads"] if variant else 1
    with torch.device("meta"):
        model = ViTEncoder(patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads,
                           pos_grid=weights.pos_grid or 14)
    try:
        weights.check(model, what=f"ViT encoder these weights describe ({variant or 'custom'})")
    except ValueError as e:
        raise ValueError(f"{weights.source!r}: {e}") from None
    summary = {"file": weights.source, "format": weights.format, "layout": weights.describe(),
               "prefix": weights.prefix, "variant": variant, "kind": "vit", "embed_dim": dim, "depth": depth,
               "patch_size": patch, "pos_grid": weights.pos_grid, "parameters": sum(t.numel() for t in sd.values()),
               "tensors": len(sd), "dropped": weights.dropped}
    return summary, sd


def _summarize_any(path: str) -> tuple[dict, dict]:
    """MiT weights (TSCD, AFA) or, when the file is not MiT, ViT weights (ToCo); the MiT error when neither."""
    try:
        return summarize(path)
    except ValueError as mit_err:
        try:
            return summarize_vit(path)
        except ValueError:
            raise mit_err from None


def _variant_text(s: dict) -> str:
    if s["variant"] is None:
        return f"custom (embed_dims={s['embed_dims']}, depths={s['depths']}: not one of mit_b0..mit_b5)"
    name = s["variant"]
    return f"{name} (B{name[-1]})" if name[-1].isdigit() else name


def _lines(s: dict) -> list[str]:
    params = s["parameters"]
    if s.get("kind") == "vit":
        return [f"file        {s['file']}", f"format      {s['layout']}",
                f"variant     {s['variant'] or 'custom'} (ViT: ToCo's backbone, model.name toco_"
                f"{(s['variant'] or 'vit_base').removesuffix('_demo')})",
                f"shapes      embed_dim={s['embed_dim']}, depth={s['depth']}, patch={s['patch_size']}, "
                f"positional grid {s['pos_grid']}x{s['pos_grid']}",
                f"parameters  {params:,} ({params / 1e6:.2f} M) in {s['tensors']} tensors (encoder only)"]
    return [
        f"file        {s['file']}",
        f"format      {s['format']}: {s['layout']}",
        f"encoder     {'under ' + repr(s['prefix']) if s['prefix'] else 'bare (no prefix)'}",
        f"variant     {_variant_text(s)}",
        f"shapes      embed_dims={s['embed_dims']}, depths={s['depths']}, sr_ratios={s['sr_ratios']}, "
        f"in_chans={s['in_chans']}",
        f"parameters  {params:,} ({params / 1e6:.2f} M) in {s['tensors']} tensors (encoder only)",
        f"dropped     {len(s['dropped'])} tensor(s)" + (f": {', '.join(s['dropped'][:4])}"
                                                       + (", ..." if len(s["dropped"]) > 4 else "")
                                                       if s["dropped"] else ""),
    ]


def run_inspect(args: argparse.Namespace) -> int:
    try:
        summary, _ = _summarize_any(args.file)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        logger.error("%s", err)
        return 1
    print(json.dumps(summary, indent=2) if args.json else "\n".join(_lines(summary)))
    return 0


def run_convert(args: argparse.Namespace) -> int:
    import torch

    if os.path.exists(args.output) and not args.force:
        logger.error("`OUT` %r already exists; pass --force to overwrite it", args.output)
        return 1
    try:
        summary, state_dict = summarize(args.input)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        logger.error("%s", err)
        return 1
    out_dir = os.path.dirname(os.path.abspath(args.output))
    os.makedirs(out_dir, exist_ok=True)
    torch.save({k: v.contiguous() for k, v in state_dict.items()}, args.output)
    print("read\n  " + "\n  ".join(_lines(summary)))
    print(f"wrote {args.output}: tscd/SegFormer MiT format, {summary['tensors']} tensors "
          f"({summary['parameters']:,} parameters); use it with model.pretrained={args.output}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("weights", help="inspect or convert MiT encoder weights (SegFormer, Hugging Face, "
                                              "mmsegmentation); inspect ViT weights (DeiT, timm, Hugging Face)",
                              description="Inspect or convert MiT encoder weights. Formats are recognised from the "
                                          "keys and shapes; model.pretrained reads them all directly.")
    actions = p.add_subparsers(dest="weights_action", metavar="<action>")
    p.set_defaults(func=lambda _args: (p.print_help(), 2)[1])

    inspect = actions.add_parser("inspect", help="print the format, variant (B0-B5) and parameter count")
    inspect.add_argument("file", help="weight file or folder (.pth, .bin, .safetensors, a Hugging Face folder)")
    inspect.add_argument("--json", action="store_true", help="print machine-readable JSON")
    inspect.set_defaults(func=run_inspect)

    convert = actions.add_parser("convert", help="write the encoder in tscd's format (a plain state dict)")
    convert.add_argument("input", metavar="IN", help="weight file or folder in any supported format")
    convert.add_argument("output", metavar="OUT", help="output .pth file (tscd/SegFormer MiT keys)")
    convert.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    convert.set_defaults(func=run_convert)
