"""Models: nn.Modules that hold parameters and call ``clusterformer.ops``."""

from clusterformer.models.backbone import ClusterBlock, ClusterFormer
from clusterformer.models.mixer import CENTER_UPDATES, DISPATCHINGS, ClusteringMixer, Dispatch
from clusterformer.models.registry import (
    PRESETS,
    TASKS,
    create_model,
    list_models,
    preset_config,
    register_task,
)

__all__ = [
    "CENTER_UPDATES",
    "DISPATCHINGS",
    "PRESETS",
    "TASKS",
    "ClusterBlock",
    "ClusterFormer",
    "ClusteringMixer",
    "Dispatch",
    "create_model",
    "list_models",
    "preset_config",
    "register_task",
]
