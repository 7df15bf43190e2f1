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
from tscd.kernels.reference.permutohedral import (
    MAX_DENSE_POINTS,
    crf_features,
    dense_crf_reference,
    dense_energy_loss_reference,
    permutohedral_filter_reference,
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
    "MAX_DENSE_POINTS",
    "crf_features",
    "dense_crf_reference",
    "dense_energy_loss_reference",
    "permutohedral_filter_reference",
    "DEFAULT_DILATIONS",
    "OFFSETS",
    "neighbour_shifts",
    "position_prior",
    "refine_reference",
    "refine_weights_reference",
    "shift_clamped",
]
