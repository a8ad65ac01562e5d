"""A backbone defined outside the library: four strided convolutions giving maps at strides 4,
8, 16 and 32. Loaded as a plugin (``CLUSTERFORMER_PLUGINS=tiny_conv_backbone`` with this folder
on the path), ``cf train --model tiny-conv`` trains any task on it and ``cf eval`` rebuilds it
from the checkpoint: its module and the one ``register_backbone`` line at the bottom are all it
takes; nothing in ``clusterformer`` names it.

It is written against the contract's first form, ``forward_features(images, pixel_mask,
return_masks=True)`` (``forward_pyramid`` is the current name): backbones written before the
rename keep working, and the plugin tests check that they do.
"""

from __future__ import annotations

from torch import Tensor, nn

from clusterformer.models import register_backbone
from clusterformer.models.layers import downsample_mask, zero_padding
from clusterformer.ops.images import IMAGENET_MEAN, IMAGENET_STD

STRIDES = (4, 8, 16, 32)


class TinyConvBackbone(nn.Module):
    """``(B, 3, H, W)`` -> maps ``(B, width * 2**i, ceil(H / s), ceil(W / s))`` for the four
    strides ``s``, padded tokens zeroed; follows the backbone contract
    (:mod:`clusterformer.models.backbones`)."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        channels = [width * 2**i for i in range(len(STRIDES))]
        self.stem = nn.Conv2d(3, channels[0], kernel_size=7, stride=4, padding=3)
        self.downs = nn.ModuleList(nn.Conv2d(a, b, kernel_size=3, stride=2, padding=1)
                                   for a, b in zip(channels, channels[1:], strict=False))  # fmt: skip
        self.feature_info = [{"num_chs": c, "reduction": s, "module": f"downs.{i - 1}"}
                             for i, (c, s) in enumerate(zip(channels, STRIDES, strict=True))]  # fmt: skip
        self.default_cfg = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}

    def forward_features(
        self, images: Tensor, pixel_mask: Tensor | None = None, *, return_masks: bool = False
    ) -> list[Tensor] | tuple[list[Tensor], list[Tensor | None]]:
        x = zero_padding(images, pixel_mask)
        features, masks = [], []
        for index, stride in enumerate(STRIDES):
            x = (self.stem if index == 0 else self.downs[index - 1])(x).relu()
            mask = downsample_mask(pixel_mask, stride)
            x = zero_padding(x, mask)
            features.append(x)
            masks.append(mask)
        return (features, masks) if return_masks else features


register_backbone("tiny-conv", TinyConvBackbone, about="test-only: four strided convolutions")
