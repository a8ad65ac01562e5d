"""Any timm ``features_only`` model as a backbone (``--model timm/<name>``; optional extra
``pip install 'clusterformer[timm]'``).

The model is built with ``pretrained=False``; ImageNet weights a user has on disk load with
``--backbone-weights PATH``, timm's own published ones with ``--backbone-weights timm``
(:meth:`TimmBackbone.pretrained_weights`: from the Hugging Face Hub when online, from its local
cache offline), both through :func:`clusterformer.models.backbone_weights.load_backbone_weights`.
Its outputs at strides 4, 8, 16 and 32 become the four maps of the backbone contract, and its
own ``mean`` / ``std`` become the model's (and the checkpoint's) normalisation.

Padding. A timm model does not know the pixel mask: padded pixels are zero-filled images it
convolves like real ones, so, unlike the ClusterFormer backbone, its features near the border
of a padded image differ from the unpadded image's. Each map's token mask is the pixel mask
any-pooled to the map's stride, and the padded tokens are zeroed so the heads ignore them.
"""

from __future__ import annotations

from importlib import metadata
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clusterformer.models.backbones import FEATURE_STRIDES
from clusterformer.models.layers import downsample_mask, zero_padding
from clusterformer.ops.images import IMAGENET_MEAN, IMAGENET_STD


def _mask_like(mask: Tensor | None, stride: int, shape: tuple[int, int]) -> Tensor | None:
    """The pixel mask at ``stride``, cropped or padded (with padding) to a map's ``shape``."""
    small = downsample_mask(mask, stride)
    if small is None:
        return None
    height, width = shape
    small = small[:, :height, :width]
    return F.pad(small, (0, width - small.shape[-1], 0, height - small.shape[-2]), value=False)


def torchvision_mismatch() -> str:
    """One line for "operator torchvision::nms does not exist": the torchvision installed was
    built for another torch, and the version that pairs with this one."""
    try:
        installed = metadata.version("torchvision")
    except metadata.PackageNotFoundError:
        installed = "?"
    release = torch.__version__.split("+")[0]
    major, minor = (int(x) for x in release.split(".")[:2])
    wanted = f"0.{minor + 15}" if major == 2 else "the release paired with it"  # 2.N <-> 0.(N+15)
    build = torch.__version__.partition("+")[2]
    return (f"timm cannot be imported: torchvision {installed} was built for another torch than "
            f"this torch {torch.__version__} (\"operator torchvision::nms does not exist\"); fix: "
            f"pip install torchvision=={wanted}.*" + (f" built for {build} like torch (from the "
            "index torch came from)" if build else ""))  # fmt: skip


def import_timm(what: str) -> ModuleType:
    """``import timm``, or ValueError with one line saying how to get a working one (``what``
    names what needed it)."""
    try:
        import timm
    except ImportError as exc:
        if "torchvision" in str(exc) and "symbol" in str(exc):  # a C extension for another torch
            raise ValueError(torchvision_mismatch()) from None
        raise ValueError(f"{what} needs timm: pip install 'clusterformer[timm]' (with a "
                         "torchvision that matches your torch)") from None  # fmt: skip
    except RuntimeError as exc:
        if "torchvision::" in str(exc):
            raise ValueError(torchvision_mismatch()) from None
        raise
    return timm


class TimmBackbone(nn.Module):
    """``timm.create_model(name, features_only=True)`` under the backbone contract.

    Args:
        name: a timm model name (``resnet50``, ``convnext_tiny``, ...) whose features include
            the ``strides`` the heads need.
        strides: the strides of the maps to give, in order (the backbone contract's four).
        options: passed to ``timm.create_model``.
    """

    def __init__(self, name: str, strides: tuple[int, ...] = FEATURE_STRIDES, **options: Any) -> None:
        super().__init__()
        timm = import_timm(f"timm/{name}")
        self.timm_name, self.timm_options = name, dict(options)
        try:
            self.body = timm.create_model(name, pretrained=False, features_only=True, **options)
        except RuntimeError as exc:  # timm's "Unknown model" and features_only refusals
            raise ValueError(f"timm/{name}: {exc}") from None
        reductions = [int(r) for r in self.body.feature_info.reduction()]
        missing = [s for s in strides if s not in reductions]
        if missing:
            raise ValueError(f"timm/{name} has feature maps at strides {reductions}, none at "
                             f"{missing}; the heads need {', '.join(map(str, strides))}")  # fmt: skip
        self.strides = tuple(strides)
        self.picks = [reductions.index(s) for s in self.strides]
        channels = self.body.feature_info.channels()
        self.feature_info = [{"num_chs": int(channels[i]), "reduction": s, "module": f"body.{i}"}
                             for i, s in zip(self.picks, self.strides, strict=True)]  # fmt: skip
        self.channels_last_output = getattr(self.body, "output_fmt", "NCHW") == "NHWC"
        cfg = getattr(self.body, "pretrained_cfg", None) or {}
        self.default_cfg = {"mean": tuple(cfg.get("mean", IMAGENET_MEAN)),
                            "std": tuple(cfg.get("std", IMAGENET_STD)), "timm_model": name}

    def forward_pyramid(
        self, images: Tensor, pixel_mask: Tensor | None = None
    ) -> tuple[list[Tensor], list[Tensor | None]]:
        """Maps at the strides asked for (``(B, C_i, H_i, W_i)``, padded tokens zeroed) and
        their token masks (the backbone contract)."""
        if pixel_mask is not None:
            images = zero_padding(images, pixel_mask)
        outputs = self.body(images)
        features, masks = [], []
        for index, stride in zip(self.picks, self.strides, strict=True):
            x = outputs[index]
            if self.channels_last_output:
                x = x.permute(0, 3, 1, 2)
            mask = _mask_like(pixel_mask, stride, (x.shape[-2], x.shape[-1]))
            features.append(zero_padding(x, mask))
            masks.append(mask)
        return features, masks

    def pretrained_weights(self) -> dict[str, Tensor]:
        """timm's published weights of this model, named as this module's tensors: fetched from
        the Hugging Face Hub into its cache (``HF_HOME`` / ``HF_HUB_CACHE``) once, read from that
        cache after; with ``HF_HUB_OFFLINE=1`` only the cache is read.

        Raises:
            ValueError: timm publishes no weights for the model, or they could not be had (the
                message says why and what to do instead).
        """
        timm = import_timm(f"timm/{self.timm_name}")
        cfg = getattr(self.body, "pretrained_cfg", None) or {}
        if not any(cfg.get(key) for key in ("hf_hub_id", "url", "file")):
            raise ValueError(f"timm/{self.timm_name}: timm publishes no pretrained weights for "
                             "this model; pass --backbone-weights FILE")  # fmt: skip
        try:
            source = timm.create_model(self.timm_name, pretrained=True, features_only=True,
                                       **self.timm_options)  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - hub, network and file errors come in many types
            reason = " ".join(str(exc).split())[:100] or type(exc).__name__
            raise ValueError(f"timm/{self.timm_name}: timm's pretrained weights could not be "
                             f"loaded ({type(exc).__name__}: {reason}); they are fetched from the "
                             "Hugging Face Hub into its cache when online (HF_HUB_OFFLINE=1 reads "
                             "only the cache), or pass --backbone-weights FILE") from None  # fmt: skip
        return {f"body.{k}": v for k, v in source.state_dict().items()}
