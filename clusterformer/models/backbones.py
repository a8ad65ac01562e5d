"""The backbone contract, the backbones that follow it, and loading a backbone's weights.

A backbone is an ``nn.Module`` with

* ``feature_info``: one dict per output map, timm's convention: ``num_chs`` (channels) and
  ``reduction`` (stride); the dense heads need maps at strides 4, 8, 16 and 32, in that order;
* ``forward_features(images (B, 3, H, W), pixel_mask (B, H, W) | None, return_masks=True)``
  returning the maps ``[(B, C_i, H_i, W_i)]`` (zero at padded positions) and their token masks
  ``[(B, H_i, W_i) bool | None]``;
* ``default_cfg`` with the ``mean`` / ``std`` its inputs are normalised with.

:class:`~clusterformer.models.backbone.ClusterFormer` is one; a timm ``features_only`` model
behind :class:`~clusterformer.models.timm_backbone.TimmBackbone` (``timm/<name>``) is another.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from clusterformer.models.backbone import ClusterFormer
from clusterformer.models.layers import masked_mean

FEATURE_STRIDES: tuple[int, ...] = (4, 8, 16, 32)
TIMM_PREFIX = "timm/"


def _option(help: str) -> Any:  # noqa: A002 - the field's help text
    return field(default=None, metadata={"help": help})


@dataclass
class BackboneOptions:
    """Overrides of a preset's ClusterFormer backbone (``model.backbone`` in a training config;
    the constructor arguments of :class:`~clusterformer.models.backbone.ClusterFormer`).
    ``None`` keeps the preset's value."""

    depths: tuple[int, ...] | None = _option("blocks per stage (4 numbers)")
    dims: tuple[int, ...] | None = _option("channels per stage (4 numbers)")
    mlp_ratios: tuple[float, ...] | None = _option("MLP expansion per stage (4 numbers)")
    head_dim: int | None = _option("channels per clustering head (32)")
    window_size: int | None = _option("window side in tokens (7)")
    center_grid: tuple[int, ...] | None = _option("centers per window, gh,gw (3,3)")
    num_iters: int | None = _option("recurrent clustering iterations T (3)")
    center_update: str | None = _option("Table S1c: recurrent, vanilla_attention, kmeans, cosine")
    dispatching: str | None = _option("Table S1e: ours, none, fc, confidence, fc_similarity")
    m_step: str | None = _option("clustering M-step: sum (the paper's) or mean")
    dispatch_mlp_ratio: float | None = _option("dispatching MLP width relative to dim (0.125)")
    drop_path_rate: float | None = _option("stochastic depth of the last block (0)")
    layer_scale_init: float | None = _option("initial layer scale (1e-5)")
    head_pool: str | None = _option("classifier pooling: last (stage 4) or concat (all stages)")


def feature_channels(backbone: nn.Module) -> tuple[int, ...]:
    """The channels of ``backbone``'s maps at strides 4, 8, 16, 32 (ValueError if it does not
    declare exactly those maps in ``feature_info``)."""
    info = getattr(backbone, "feature_info", None)
    if info is None:
        raise ValueError(f"{type(backbone).__name__} declares no feature_info (channels and "
                         "stride per output); it cannot feed the dense heads")  # fmt: skip
    strides = tuple(int(f["reduction"]) for f in info)
    if strides != FEATURE_STRIDES:
        raise ValueError(f"{type(backbone).__name__} gives maps at strides {strides}; the dense "
                         f"heads need {FEATURE_STRIDES}")  # fmt: skip
    return tuple(int(f["num_chs"]) for f in info)


def build_backbone(name: str | None, options: dict[str, Any], *, num_classes: int = 0) -> nn.Module:
    """``name`` ``None``: a ClusterFormer backbone with ``options`` (a preset's constructor
    options and overrides); ``"timm/<model>"``: that timm model's features (``options`` are
    passed to ``timm.create_model``)."""
    if name is None:
        return ClusterFormer(**{**options, "num_classes": num_classes})
    if not name.startswith(TIMM_PREFIX):
        raise ValueError(f"unknown backbone {name!r}; give a preset or {TIMM_PREFIX}<name>")
    from clusterformer.models.timm_backbone import TimmBackbone

    return TimmBackbone(name[len(TIMM_PREFIX):], FEATURE_STRIDES, **options)


class FeatureClassifier(nn.Module):
    """Any backbone's last map, masked-average pooled, layer-normed and classified:
    ``(B, 3, H, W)`` (+ optional ``(B, H, W)`` mask) -> ``(B, num_classes)``."""

    def __init__(self, backbone: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        channels = feature_channels(backbone)[-1]
        self.num_classes = int(num_classes)
        self.default_cfg = {**dict(getattr(backbone, "default_cfg", {}) or {}),
                            "num_classes": self.num_classes}  # fmt: skip
        self.head_norm = nn.LayerNorm(channels)
        self.head = nn.Linear(channels, num_classes) if num_classes else nn.Identity()

    def forward(self, images: Tensor, pixel_mask: Tensor | None = None) -> Tensor:
        features, masks = self.backbone.forward_features(images, pixel_mask, return_masks=True)
        return self.head(self.head_norm(masked_mean(features[-1], masks[-1])))


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    """Tensors of a safetensors file, or of a state dict read with ``weights_only=True``
    (nested under ``state_dict`` / ``model`` as training scripts often save it)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: backbone weights not found")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ValueError(f"{path}: not a readable safetensors file ({exc})") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unpickling refusals come in several types
        raise ValueError(f"{path}: not a state dict that loads with weights_only=True "
                         f"({type(exc).__name__}); save the weights as safetensors") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a dict of tensors (a state dict)")
    return state


def _best_prefix(own: set[str], theirs: dict[str, Tensor]) -> dict[str, Tensor]:
    """``theirs`` with the key prefix (none, or ``backbone.`` / ``model.`` / ``body.`` added or
    removed) that matches most of ``own``."""
    candidates = [theirs]
    for prefix in ("backbone.", "model.", "body.", "module."):
        candidates.append({k[len(prefix):]: v for k, v in theirs.items() if k.startswith(prefix)})
        candidates.append({prefix + k: v for k, v in theirs.items()})
    return max(candidates, key=lambda c: len(own & set(c)))


def load_backbone_weights(model: nn.Module, path: str | Path) -> int:
    """Load a state dict file into ``model.backbone`` (or ``model`` itself when it is the
    backbone): every backbone tensor must be in the file with its shape; tensors of a
    classifier head the file also holds are ignored. Returns the number loaded."""
    path = Path(path)
    target = getattr(model, "backbone", model)
    inner = getattr(target, "body", target)  # a timm adapter loads into the timm model
    own = inner.state_dict()
    skip = ("head.", "head_norm.") if inner is target else ()
    wanted = {k: v for k, v in own.items() if not k.startswith(skip)}
    source = _best_prefix(set(wanted), _read_state_dict(path))
    for name in sorted(wanted):
        if name not in source:
            raise ValueError(f"{path}: backbone tensor {name} is missing from the file "
                             f"({len(set(wanted) & set(source))} of {len(wanted)} found); "
                             "is it the weights of this backbone?")  # fmt: skip
        if tuple(source[name].shape) != tuple(wanted[name].shape):
            raise ValueError(f"{path}: tensor {name} is {tuple(source[name].shape)} in the file, "
                             f"{tuple(wanted[name].shape)} in the backbone")  # fmt: skip
        if not bool(torch.isfinite(source[name]).all()) and source[name].is_floating_point():
            raise ValueError(f"{path}: tensor {name} holds NaN or infinity")
    inner.load_state_dict({k: source[k] for k in wanted}, strict=False)
    return len(wanted)
