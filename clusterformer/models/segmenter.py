"""The ClusterFormer segmenter: the detector's backbone, pixel decoder and clustering decoder
with a mask head (Mask2Former-style mask classification) instead of boxes.

``forward(images (B, 3, H, W), pixel_mask (B, H, W) | None) -> dict``:

* ``"pred_logits"`` ``(B, Q, C + 1)``: softmax class logits, the last column "no object".
* ``"pred_masks"`` ``(B, Q, H4, W4)``: mask logits on the stride-4 grid of the PADDED batch
  (``H4 = ceil(H / 4)``); an image's real part is its top-left ``ceil(h / 4) x ceil(w / 4)``.
  Each is ``mask_embed(center) . pixel_embedding`` -- a per-center MLP embedding dotted with
  the pixel decoder's stride-4 ``mask_features``.
* ``"aux_outputs"``: ``pred_logits`` and ``pred_masks`` after every earlier decoder layer
  (deep supervision).
* ``"enc_outputs"``: the encoder-selected initial centers' logits and masks (``query_init``
  ``"encoder"`` / ``"mixed"``), supervised like a layer so the selection head learns.

``masked_attention=True`` (ablation switch, off by default) restricts each center's clustering
in layer ``l`` to the pixels where its layer ``l - 1`` mask has probability > 0.5 (Mask2Former's
masked attention; a center whose mask is empty sees every pixel). The previous masks are
bilinearly resized to the next layer's scale, so with this switch padding can shift mask
borders by a token.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clusterformer.models.backbones import backbone_maps, build_backbone, feature_channels
from clusterformer.models.cluster_decoder import MLP
from clusterformer.models.dense import DecoderOptions, DenseModel

# Flat options of the segmenter (``create_model`` overrides); every other one is the backbone's.
SEGMENTER_OPTIONS: tuple[str, ...] = tuple(
    flat for name, flat in DecoderOptions.flat_names().items() if name != "iterative_refinement"
)


class ClusterFormerSegmenter(DenseModel):
    """Backbone + pixel decoder (with stride-4 mask features) + clustering decoder + mask head.

    Args:
        num_classes: ``C`` real classes (the class head has ``C + 1`` outputs).
        backbone: a module following the backbone contract (:mod:`.backbones`).
        decoder: :class:`~clusterformer.models.dense.DecoderOptions`; unset ones fit the
            backbone (``iterative_refinement`` does not apply to masks).
    """

    def __init__(self, num_classes: int, backbone: nn.Module,
                 decoder: DecoderOptions | None = None) -> None:  # fmt: skip
        decoder = (decoder or DecoderOptions()).resolved(feature_channels(backbone)[-1])
        super().__init__(backbone, decoder, int(num_classes) + 1, box_head=False, no_object=True,
                         mask_features=True)  # fmt: skip
        self.num_classes = int(num_classes)
        self.masked_attention = bool(decoder.masked_attention)
        self.default_cfg["num_classes"] = self.num_classes
        self.mask_embed = MLP(decoder.hidden_dim, decoder.hidden_dim, decoder.hidden_dim, 3)

    def forward(self, images: Tensor, pixel_mask: Tensor | None = None) -> dict:
        """images ``(B, 3, H, W)``, pixel_mask ``(B, H, W)`` bool (True = real) -> outputs dict."""
        features, masks = backbone_maps(self.backbone, images, pixel_mask)
        pyramid = self.pixel_decoder(features, masks)
        mask_features = pyramid.mask_features
        predicted: list[Tensor] = []

        def hook(hidden: Tensor, next_shape: tuple[int, int] | None) -> Tensor | None:
            logits = torch.einsum("bqc,bchw->bqhw", self.mask_embed(hidden), mask_features)
            predicted.append(logits)
            if not self.masked_attention or next_shape is None:
                return None
            return attention_mask(logits.detach(), next_shape)

        outputs = self.decoder(pyramid.features, pyramid.masks, layer_hook=hook)
        initial, per_layer = predicted[0], predicted[1:]
        result: dict = {
            "pred_logits": outputs["pred_logits"],
            "pred_masks": per_layer[-1],
            "aux_outputs": [
                {"pred_logits": aux["pred_logits"], "pred_masks": m}
                for aux, m in zip(outputs["aux_outputs"], per_layer[:-1], strict=True)
            ],
        }
        if "enc_outputs" in outputs:
            result["enc_outputs"] = {"pred_logits": outputs["enc_outputs"]["pred_logits"],
                                     "pred_masks": initial}
        return result


def attention_mask(mask_logits: Tensor, shape: tuple[int, int]) -> Tensor:
    """``(B, Q, H4, W4)`` mask logits -> ``(B, Q, h * w)`` bool: probability > 0.5 at the
    ``shape`` scale; a center whose mask is empty there may see every pixel."""
    resized = F.interpolate(mask_logits.float(), size=shape, mode="bilinear", align_corners=False)
    allowed = (resized > 0).flatten(2)
    return allowed | ~allowed.any(dim=-1, keepdim=True)


def build_segmenter(num_classes: int, backbone: str | None = None,
                    **options: Any) -> ClusterFormerSegmenter:  # fmt: skip
    """The mask-classification architecture's builder: ``options`` mixes backbone options and
    :data:`SEGMENTER_OPTIONS`; ``backbone`` names a registered backbone (``None``: the
    ClusterFormer backbone with ``options``, see :func:`~.backbones.build_backbone`)."""
    decoder = DecoderOptions.pop_flat(options)
    return ClusterFormerSegmenter(num_classes, build_backbone(backbone, options), decoder)
