"""The backbone contract, the backbone registry, and the built-in backbones.

A backbone is an ``nn.Module`` with

* ``feature_info``: one dict per output map, timm's convention: ``num_chs`` (channels) and
  ``reduction`` (stride); the dense heads need maps at strides 4, 8, 16 and 32, in that order;
* ``forward_pyramid(images (B, 3, H, W), pixel_mask (B, H, W) | None)`` returning the maps
  ``[(B, C_i, H_i, W_i)]`` (zero at padded positions) and their token masks
  ``[(B, H_i, W_i) bool | None]`` (read through :func:`backbone_maps`, which also takes the
  contract's first form, ``forward_features(images, pixel_mask, return_masks=True)``: a
  ClusterFormer's ``forward_features`` is timm's, one map);
* ``default_cfg`` with the ``mean`` / ``std`` its inputs are normalised with;
* when it has a classifier of its own, ``classifier_modules``: the names of the modules that
  are not features, which loading a backbone's weights leaves alone (every other tensor of the
  module is a backbone weight, :mod:`.backbone_weights`);
* optionally ``pretrained_weights()``: its published weights, named as its own tensors
  (``--backbone-weights timm``).

Every ``--model`` name is a registered backbone (:data:`BACKBONES`): the ClusterFormer presets
(:class:`~clusterformer.models.backbone.ClusterFormer` with a preset's options), and the
``timm/`` family (``timm/<name>``: a timm ``features_only`` model behind
:class:`~clusterformer.models.timm_backbone.TimmBackbone`). A name with a slash is resolved
here and only here (:func:`resolve_backbone`): the part before it names a family, the rest is
the family's variant. A backbone is its module and one :func:`register_backbone` line: at the
bottom of this file for a built-in one (naming its builder by import path, so registering
imports nothing), in the module itself for a plugin's (its module named in
``CLUSTERFORMER_PLUGINS`` or the entry points, :mod:`clusterformer.plugins`, imported when a
name is not known yet).
"""

from __future__ import annotations

import copy
import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from clusterformer.models.layers import masked_mean
from clusterformer.plugins import PluginError, load_task_modules
from clusterformer.registry import Registry

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
    center_update: str | None = _option("Table S1c: recurrent, vanilla_attention, kmeans, cosine, "
                                        "criss_cross")
    dispatching: str | None = _option("Table S1e: ours, none, fc, confidence, fc_similarity")
    m_step: str | None = _option("clustering M-step: sum (the paper's) or mean")
    dispatch_mlp_ratio: float | None = _option("dispatching MLP width relative to dim (0.125)")
    drop_path_rate: float | None = _option("stochastic depth of the last block (0)")
    layer_scale_init: float | None = _option("initial layer scale (1e-5)")
    head_pool: str | None = _option("classifier pooling: last (stage 4) or concat (all stages)")


@dataclass(frozen=True)
class Backbone:
    """How to build one registered backbone.

    Attributes:
        build: ``build(**options) -> nn.Module`` following the backbone contract; for a family
            (a name ending in ``/``) ``build(variant, **options)``, ``variant`` being the part
            of the name after the slash (``timm/resnet50`` -> ``"resnet50"``). Or its import
            path, ``"package.module:name"``, imported when first built (the built-in ones: a
            registration imports nothing).
        options: the option names it takes (``create_model`` overrides, ``model.backbone.*``);
            ``None``: the keyword arguments of ``build`` (``num_classes`` aside).
        defaults: the options it is built with unless overridden (a preset's).
        classifies: ``build`` takes ``num_classes`` and the module classifies by itself
            (``forward`` gives logits); otherwise a classifier puts :class:`FeatureClassifier`'s
            pooled linear head on its last map.
        about: one line for ``cf models``.
    """

    build: Callable[..., nn.Module] | str
    options: tuple[str, ...] | None = None
    defaults: dict[str, Any] = field(default_factory=dict)
    classifies: bool = False
    about: str = ""

    def builder(self) -> Callable[..., nn.Module]:
        """``build``, imported first when it is an import path."""
        if not isinstance(self.build, str):
            return self.build
        module, _, name = self.build.partition(":")
        return getattr(importlib.import_module(module), name)

    def option_names(self, family: bool = False) -> tuple[str, ...]:
        """The options it accepts (its ``options``, else ``build``'s keyword arguments)."""
        if self.options is not None:
            return tuple(self.options)
        params = list(inspect.signature(self.builder()).parameters.values())[1 if family else 0:]
        # num_classes is the architecture's; device / dtype place a module, they do not shape it.
        return tuple(p.name for p in params if p.name not in ("self", "num_classes", "device", "dtype")
                     and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))  # fmt: skip


# Names it does not know make it import the plugins (which may register backbones).
BACKBONES: Registry[Backbone] = Registry("backbone", load=load_task_modules)


def register_backbone(name: str, backbone: Backbone | Callable[..., nn.Module] | str | None = None,
                      *, replace: bool = False, **fields: Any):  # noqa: ANN201 - entry or decorator
    """Make ``--model name`` (and ``create_model(name, ...)``) build this backbone.

    ``backbone`` is a :class:`Backbone`, or its ``build`` (a callable or an import path) with
    the other :class:`Backbone` fields as keywords; without it, a decorator
    (``@register_backbone("x")`` on a module class or a builder function). A name ending in
    ``/`` registers a family.

    Raises:
        DuplicateNameError: ``name`` is taken and ``replace`` is false.
    """
    if backbone is None:
        BACKBONES.check_free(name, replace=replace)

        def decorator(build: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
            register_backbone(name, build, replace=replace, **fields)
            return build

        return decorator
    entry = backbone if isinstance(backbone, Backbone) else Backbone(backbone, **fields)
    return BACKBONES.register(name, entry, replace=replace)


def backbone_names() -> list[str]:
    """Every ``--model`` name, a family shown as ``family/<name>``."""
    return [name + "<name>" if name.endswith("/") else name for name in BACKBONES.names()]


def resolve_backbone(name: str) -> tuple[Backbone, str | None]:
    """``name`` -> (its :class:`Backbone`, the variant for a family's name, else None).

    Raises:
        ValueError: no backbone of that name (the message lists them).
    """
    family, slash, variant = str(name).partition("/")
    key = family + "/" if slash else name
    if key not in BACKBONES:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(backbone_names())}")
    if slash and not variant:
        raise ValueError(f"model {name!r} names no {family} model: give {family}/<name>")
    if not slash and name.endswith("/"):
        raise ValueError(f"model {name!r} names no model: give {name}<name>")
    return BACKBONES.get(key), (variant if slash else None)


def is_backbone(name: str) -> bool:
    """Whether ``name`` is a ``--model`` name (a registered backbone, or a family's variant)."""
    try:
        resolve_backbone(name)
    except PluginError:  # a plugin that fails to import is its own error, not an unknown name
        raise
    except ValueError:
        return False
    return True


def timm_model_name(name: str) -> str | None:
    """The timm model of a ``timm/<name>`` model name, None for any other name."""
    return name[len(TIMM_PREFIX):] if name.startswith(TIMM_PREFIX) else None


def backbone_options(name: str) -> tuple[str, ...]:
    """The options backbone ``name`` accepts."""
    entry, variant = resolve_backbone(name)
    return entry.option_names(family=variant is not None)


def backbone_defaults(name: str) -> dict[str, Any]:
    """A copy of the options backbone ``name`` is built with unless overridden."""
    return copy.deepcopy(resolve_backbone(name)[0].defaults)


def build_backbone(name: str | None, options: dict[str, Any], *, num_classes: int = 0) -> nn.Module:
    """Backbone ``name`` built with its defaults updated by ``options``; ``None`` is the
    ClusterFormer backbone with exactly ``options``. A backbone that classifies by itself gets
    ``num_classes`` (0: none)."""
    if name is None:
        from clusterformer.models.backbone import ClusterFormer

        return ClusterFormer(**{**options, "num_classes": num_classes})
    entry, variant = resolve_backbone(name)
    merged = {**copy.deepcopy(entry.defaults), **options}
    if entry.classifies:
        merged["num_classes"] = num_classes
    build = entry.builder()
    return build(variant, **merged) if variant is not None else build(**merged)


def backbone_maps(
    backbone: nn.Module, images: Tensor, pixel_mask: Tensor | None = None
) -> tuple[list[Tensor], list[Tensor | None]]:
    """``backbone``'s maps at strides 4-32 and their token masks (the backbone contract).

    Backbones written against the contract's first form, which named the method
    ``forward_features(images, pixel_mask, return_masks=True)``, are read through it: timm's
    ``forward_features`` (one map) took that name over on the ClusterFormer backbone.
    """
    if hasattr(backbone, "forward_pyramid"):
        return backbone.forward_pyramid(images, pixel_mask)
    return backbone.forward_features(images, pixel_mask, return_masks=True)


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
        features, masks = backbone_maps(self.backbone, images, pixel_mask)
        return self.head(self.head_norm(masked_mean(features[-1], masks[-1])))


PRESETS: dict[str, dict[str, Any]] = {
    # CPU-sized: ~1.9 M params (1000 classes), fast at 64-128 px on two cores; tests, quickstart.
    "clusterformer-nano": {
        "depths": (1, 1, 2, 1), "dims": (32, 64, 128, 256), "mlp_ratios": (4, 4, 4, 4),
        "head_dim": 32, "num_iters": 3,
    },
    "clusterformer-tiny": {
        "depths": (2, 2, 6, 2), "dims": (96, 192, 384, 768), "mlp_ratios": (8, 8, 4, 4),
        "head_dim": 32, "num_iters": 3,
    },
    "clusterformer-small": {
        "depths": (2, 2, 18, 2), "dims": (96, 192, 384, 768), "mlp_ratios": (8, 8, 4, 4),
        "head_dim": 32, "num_iters": 3,
    },
}

# The built-in backbones: one registration line each.
for _name, _preset in PRESETS.items():
    register_backbone(_name, "clusterformer.models.backbone:ClusterFormer", defaults=_preset,
                      classifies=True, about="ClusterFormer preset (sizes above)")  # fmt: skip
register_backbone(TIMM_PREFIX, "clusterformer.models.timm_backbone:TimmBackbone", options=(),
                  about="any timm features_only model with maps at strides 4-32 (pip install "
                  "'clusterformer[timm]')")  # fmt: skip
