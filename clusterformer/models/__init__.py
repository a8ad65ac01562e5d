"""Models: nn.Modules that hold parameters and call ``clusterformer.ops``."""

from clusterformer.models.backbone import ClusterBlock, ClusterFormer
from clusterformer.models.backbone_weights import load_backbone_weights
from clusterformer.models.backbones import (
    BACKBONES,
    Backbone,
    BackboneOptions,
    FeatureClassifier,
    backbone_maps,
    backbone_names,
    build_backbone,
    feature_channels,
    is_backbone,
    register_backbone,
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
    "BACKBONES",
    "CENTER_UPDATES",
    "DISPATCHINGS",
    "PRESETS",
    "Architecture",
    "Backbone",
    "BackboneOptions",
    "ClusterBlock",
    "ClusterFormer",
    "ClusteringMixer",
    "DecoderOptions",
    "Dispatch",
    "FeatureClassifier",
    "backbone_names",
    "build_backbone",
    "create_model",
    "feature_channels",
    "is_backbone",
    "list_models",
    "load_backbone_weights",
    "preset_config",
    "backbone_maps",
    "register_architecture",
    "register_backbone",
    "register_task_model",
]
