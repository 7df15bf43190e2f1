"""The MiT variants: dims and depths of each size (a table both the encoder and the weight readers use)."""
from __future__ import annotations

#: MiT variants (SegFormer): dims and depths; heads (1, 2, 5, 8), sr (8, 4, 2, 1), MLP ratio 4 for all.
MIT_CONFIGS: dict[str, dict[str, tuple[int, ...]]] = {
    "mit_b0": {"embed_dims": (32, 64, 160, 256), "depths": (2, 2, 2, 2)},
    "mit_b1": {"embed_dims": (64, 128, 320, 512), "depths": (2, 2, 2, 2)},
    "mit_b2": {"embed_dims": (64, 128, 320, 512), "depths": (3, 4, 6, 3)},
    "mit_b3": {"embed_dims": (64, 128, 320, 512), "depths": (3, 4, 18, 3)},
    "mit_b4": {"embed_dims": (64, 128, 320, 512), "depths": (3, 8, 27, 3)},
    "mit_b5": {"embed_dims": (64, 128, 320, 512), "depths": (3, 6, 40, 3)},
    # Not a SegFormer size: a tiny MiT for the CPU demo and quick experiments (no pretrained weights exist).
    "mit_tiny": {"embed_dims": (16, 32, 64, 128), "depths": (1, 1, 1, 2), "num_heads": (1, 1, 2, 4)},
}
#: Variants SegFormer released ImageNet weights for (``mit_b*.pth``).
SEGFORMER_RELEASED: frozenset[str] = frozenset(f"mit_b{i}" for i in range(6))
