"""Pure-PyTorch references: the truth every fused backend is tested against, and ``backend="torch"``."""
from tscd.kernels.reference.refine import (
    DEFAULT_DILATIONS,
    OFFSETS,
    neighbour_shifts,
    position_prior,
    refine_reference,
    refine_weights_reference,
    shift_clamped,
)

__all__ = [
    "DEFAULT_DILATIONS",
    "OFFSETS",
    "neighbour_shifts",
    "position_prior",
    "refine_reference",
    "refine_weights_reference",
    "shift_clamped",
]
