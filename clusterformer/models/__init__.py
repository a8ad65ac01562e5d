"""Models: nn.Modules that hold parameters and call ``clusterformer.ops``."""

from clusterformer.models.backbone import ClusterBlock, ClusterFormer
from clusterformer.models.backbones import (
    BackboneOptions,
    FeatureClassifier,
    build_backbone,
    feature_channels,
    load_backbone_weights,
)
from clusterformer.models.dense import DecoderOptions
from clusterformer.models.mixer import CENTER_UPDATES, DISPATCHINGS, ClusteringMixer, Dispatch
from clusterformer.models.registry import (
    ARCHITECTURES,
    PRESETS,
    Architecture,
    create_model,
    list_models,
    preset_config,
    register_architecture,
    register_task_model,
)

__all__ = [
    "ARCHITECTURES",
    "CENTER_UPDATES",
    "DISPATCHINGS",
    "PRESETS",
    "Architecture",
    "BackboneOptions",
    "ClusterBlock",
    "ClusterFormer",
    "ClusteringMixer",
    "DecoderOptions",
    "Dispatch",
    "FeatureClassifier",
    "build_backbone",
    "create_model",
    "feature_channels",
    "list_models",
    "load_backbone_weights",
    "preset_config",
    "register_architecture",
    "register_task_model",
]
