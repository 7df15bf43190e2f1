"""Pure-PyTorch references: the truth every fused backend is tested against, and ``backend="torch"``."""
from tscd.kernels.reference.correlation import (
    DEFAULT_NUM_SAMPLES,
    NORM_EPS,
    correlation_core_reference,
    correlation_loss_reference,
    normalize_features,
    pixel_coords,
    random_coords,
    sample_features,
)
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
    "DEFAULT_NUM_SAMPLES",
    "NORM_EPS",
    "correlation_core_reference",
    "correlation_loss_reference",
    "normalize_features",
    "pixel_coords",
    "random_coords",
    "sample_features",
    "DEFAULT_DILATIONS",
    "OFFSETS",
    "neighbour_shifts",
    "position_prior",
    "refine_reference",
    "refine_weights_reference",
    "shift_clamped",
]
