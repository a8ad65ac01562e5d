"""ClusterFormer as a timm model: ``import clusterformer.timm`` registers every preset with timm
(``clusterformer_nano``, ``clusterformer_tiny``, ``clusterformer_small``; the optional extra
``pip install 'clusterformer[timm]'``).

After the import, ``timm.create_model("clusterformer_tiny", num_classes=10, drop_path_rate=0.1)``
builds the preset through timm's ``build_model_with_cfg``, so everything timm does with a model
applies: its pretrained cfg (preprocessing for ``timm.data``), ``features_only=True``, the Hub
(``save_for_hf`` / ``push_to_hf_hub``, ``hf-hub:<repo>`` names), ``train.py`` (run with this
module imported first, README "Use with timm"). The model is
:class:`~clusterformer.models.backbone.ClusterFormer` itself, which speaks timm's model API.

Weights. No published weights exist yet, so no cfg names any (no ``hf_hub_id``, ``url`` or
``file``: ``pretrained=True`` alone is refused by timm). Weights someone has load with
``pretrained=True, pretrained_cfg_overlay=dict(file=PATH)`` or from a Hub repository that
``push_to_hf_hub`` wrote.

features_only. timm's default feature wrapper runs a model's children one after the other,
which cannot run this model (coordinate channels, padding masks); its presets default to timm's
``getter`` wrapper instead, which calls ``forward_intermediates`` and prunes what follows the
last stage asked for. The maps are the four stages at strides 4, 8, 16 and 32.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from clusterformer.models.backbone import ClusterFormer
from clusterformer.models.backbones import PRESETS
from clusterformer.models.timm_backbone import import_timm
from clusterformer.models.timm_conventions import default_cfg

try:
    import_timm("clusterformer.timm")
except ValueError as exc:  # an import that cannot work is an ImportError, with import_timm's why
    raise ImportError(str(exc)) from None
from timm.models import adapt_input_conv, build_model_with_cfg, register_model  # noqa: E402

# Coordinate channels the stem reads after the image's own (models/layers.py).
COORD_CHANNELS = 2


def timm_name(preset: str) -> str:
    """The timm name of a preset: ``clusterformer-tiny`` -> ``clusterformer_tiny`` (timm's
    model names are Python identifiers)."""
    return preset.replace("-", "_")


# Read by timm's register_model (one pretrained cfg per model, keyed by its name). Each
# describes the architecture's preprocessing and layout only: no weights are claimed.
default_cfgs: dict[str, dict[str, Any]] = {
    timm_name(preset): {
        **default_cfg(), "license": "apache-2.0",
        "paper_name": "Clustering as a Universal Visual Learner (NeurIPS 2023)",
    }
    for preset in PRESETS
}


def _adapt_stem(state_dict: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Weights for a model with other image channels than theirs (``in_chans``): timm's own
    adaptation of the image part of the stem; the coordinate channels stay as they are (timm's
    would mix them into the image channels)."""
    weight = state_dict.get("stem.weight")
    wanted = getattr(getattr(model, "stem", None), "in_channels", None)
    if weight is None or wanted is None or weight.shape[1] == wanted:
        return state_dict
    image, coords = weight[:, :-COORD_CHANNELS], weight[:, -COORD_CHANNELS:]
    image = adapt_input_conv(wanted - COORD_CHANNELS, image, base_chans=image.shape[1])
    return {**state_dict, "stem.weight": torch.cat([image, coords], dim=1)}


def _entrypoint(preset: str) -> Callable[..., ClusterFormer]:
    name = timm_name(preset)

    def build(pretrained: bool = False, **kwargs: Any) -> ClusterFormer:
        return build_model_with_cfg(
            ClusterFormer, name, pretrained,
            feature_cfg={"feature_cls": "getter", "out_indices": (0, 1, 2, 3)},
            pretrained_filter_fn=_adapt_stem, **{**PRESETS[preset], **kwargs},
        )

    build.__name__ = build.__qualname__ = name
    build.__doc__ = (f"ClusterFormer preset {preset!r} (keyword arguments: "
                     "clusterformer.models.ClusterFormer's, e.g. num_classes, drop_path_rate).")
    return build


# register_model appends each entrypoint's name.
__all__ = ["default_cfgs", "timm_name"]
for _preset in PRESETS:
    globals()[timm_name(_preset)] = register_model(_entrypoint(_preset))
