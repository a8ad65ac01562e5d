"""Pure tensor functions in the style of ``torch.nn.functional``.

No module state, no in-place writes to inputs, no data-dependent Python control flow.
"""

from clusterformer.ops.clustering import (
    ASSIGNMENTS,
    ASSIGNMENTS_OVER_CENTERS,
    M_STEPS,
    criss_cross_mask,
    cross_attention_clustering_step,
    dispatch_similarity,
    dispatch_update,
    feature_dispatching,
    grid_cells,
    init_centers,
    keep_best_center,
    recurrent_cross_attention_clustering,
)
from clusterformer.ops.fused_linear import ACTIVATIONS, linear
from clusterformer.ops.images import IMAGENET_MEAN, IMAGENET_STD, normalize_image

__all__ = [
    "ACTIVATIONS",
    "ASSIGNMENTS",
    "ASSIGNMENTS_OVER_CENTERS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "M_STEPS",
    "criss_cross_mask",
    "cross_attention_clustering_step",
    "dispatch_similarity",
    "dispatch_update",
    "feature_dispatching",
    "grid_cells",
    "init_centers",
    "keep_best_center",
    "linear",
    "normalize_image",
    "recurrent_cross_attention_clustering",
]
