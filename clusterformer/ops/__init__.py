"""Pure tensor functions in the style of ``torch.nn.functional``.

No module state, no in-place writes to inputs, no data-dependent Python control flow.
"""

from clusterformer.ops.clustering import (
    ASSIGNMENTS,
    M_STEPS,
    cross_attention_clustering_step,
    dispatch_similarity,
    dispatch_update,
    feature_dispatching,
    init_centers,
    keep_best_center,
    recurrent_cross_attention_clustering,
)
from clusterformer.ops.fused_linear import ACTIVATIONS, linear

__all__ = [
    "ACTIVATIONS",
    "ASSIGNMENTS",
    "M_STEPS",
    "cross_attention_clustering_step",
    "dispatch_similarity",
    "dispatch_update",
    "feature_dispatching",
    "init_centers",
    "keep_best_center",
    "linear",
    "recurrent_cross_attention_clustering",
]
