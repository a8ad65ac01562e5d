"""The ClusterFormer detector: backbone -> pixel decoder -> clustering decoder -> class/box heads.

``forward(images (B, 3, H, W), pixel_mask (B, H, W) | None) -> dict``:

* ``"pred_logits"`` ``(B, Q, C)``: per-class sigmoid logits (no "no object" column; the
  focal loss treats every class independently).
* ``"pred_boxes"`` ``(B, Q, 4)``: cxcywh in ``[0, 1]`` of each image's REAL (unpadded) size.
* ``"aux_outputs"``: the same two keys for every earlier decoder layer (deep supervision).
* ``"enc_outputs"``: the encoder proposals the queries were selected from (``query_init``
  ``"encoder"`` / ``"mixed"``).

The pixel mask is carried through the backbone's per-stage token masks into the pixel decoder
and every clustering step, so a zero-padded image gives the outputs of the unpadded one.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from clusterformer.models.backbones import backbone_maps, build_backbone, feature_channels
from clusterformer.models.dense import DecoderOptions, DenseModel

# Flat options of the detector (``create_model`` overrides); every other one is the backbone's.
DETECTOR_OPTIONS: tuple[str, ...] = tuple(
    flat for name, flat in DecoderOptions.flat_names().items() if name != "masked_attention"
) + ("mask_features",)


class ClusterFormerDetector(DenseModel):
    """Backbone + pixel decoder + clustering decoder with class and box heads.

    Args:
        num_classes: object classes ``C``.
        backbone: a module following the backbone contract (:mod:`.backbones`).
        decoder: :class:`~clusterformer.models.dense.DecoderOptions`; unset ones fit the
            backbone (``masked_attention`` does not apply to boxes).
        mask_features: also compute the stride-4 mask features (segmentation heads use them).
    """

    def __init__(self, num_classes: int, backbone: nn.Module, decoder: DecoderOptions | None = None,
                 *, mask_features: bool = False) -> None:  # fmt: skip
        decoder = (decoder or DecoderOptions()).resolved(feature_channels(backbone)[-1])
        super().__init__(backbone, decoder, int(num_classes), box_head=True, no_object=False,
                         mask_features=mask_features)  # fmt: skip
        self.num_classes = int(num_classes)
        self.default_cfg["num_classes"] = self.num_classes

    def forward(self, images: Tensor, pixel_mask: Tensor | None = None) -> dict:
        """images ``(B, 3, H, W)``, pixel_mask ``(B, H, W)`` bool (True = real) -> outputs dict."""
        features, masks = backbone_maps(self.backbone, images, pixel_mask)
        pyramid = self.pixel_decoder(features, masks)
        outputs = self.decoder(pyramid.features, pyramid.masks)
        if pyramid.mask_features is not None:
            outputs["mask_features"] = pyramid.mask_features
        return outputs


def build_detector(num_classes: int, backbone: str | None = None, **options: Any) -> ClusterFormerDetector:
    """The detection architecture's builder: ``options`` mixes backbone options (a preset's)
    and :data:`DETECTOR_OPTIONS`; ``backbone`` names a registered backbone (``None``: the
    ClusterFormer backbone with ``options``, see :func:`~.backbones.build_backbone`)."""
    decoder = DecoderOptions.pop_flat(options)
    mask_features = bool(options.pop("mask_features", False))
    return ClusterFormerDetector(num_classes, build_backbone(backbone, options), decoder,
                                 mask_features=mask_features)  # fmt: skip
