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

from clusterformer.models.backbone import ClusterFormer
from clusterformer.models.cluster_decoder import MLP, ClusterDecoder
from clusterformer.models.detector import DETECTOR_OPTIONS, default_detector_options
from clusterformer.models.pixel_decoder import build_pixel_decoder

SEGMENTER_OPTIONS: tuple[str, ...] = tuple(
    o for o in DETECTOR_OPTIONS if o not in ("iterative_refinement", "mask_features")
) + ("masked_attention",)


class ClusterFormerSegmenter(nn.Module):
    """Backbone + pixel decoder (with stride-4 mask features) + clustering decoder + mask head.

    Args: as :class:`clusterformer.models.detector.ClusterFormerDetector` (``num_classes`` =
        ``C`` real classes; the class head has ``C + 1`` outputs), plus ``masked_attention``.
    """

    def __init__(
        self, num_classes: int, backbone: dict[str, Any], *, hidden_dim: int = 256,
        num_queries: int = 100, decoder_layers: int = 6, decoder_heads: int = 8,
        decoder_ffn_dim: int = 1024, decoder_num_iters: int = 3, decoder_m_step: str = "mean",
        decoder_center_update: str = "recurrent", decoder_dispatching: str = "ours",
        query_init: str = "encoder", pixel_decoder: str = "fpn", pixel_decoder_layers: int = 6,
        masked_attention: bool = False,
    ) -> None:
        super().__init__()
        self.num_classes = int(num_classes)
        self.masked_attention = bool(masked_attention)
        self.backbone = ClusterFormer(**{**backbone, "num_classes": 0})
        self.backbone.head_norm = nn.Identity()  # unused by dense heads (every param trains)
        self.default_cfg = {**self.backbone.default_cfg, "num_classes": self.num_classes}
        self.pixel_decoder = build_pixel_decoder(
            pixel_decoder, self.backbone.feature_channels, hidden_dim, mask_features=True,
            num_layers=pixel_decoder_layers, num_heads=decoder_heads,
        )
        self.decoder = ClusterDecoder(
            hidden_dim, self.num_classes + 1, num_queries=num_queries, num_layers=decoder_layers,
            num_heads=decoder_heads, ffn_dim=decoder_ffn_dim, num_iters=decoder_num_iters,
            m_step=decoder_m_step, center_update=decoder_center_update,
            dispatching=decoder_dispatching, query_init=query_init, iterative_refinement=False,
            box_head=False, no_object=True,
        )
        self.mask_embed = MLP(hidden_dim, hidden_dim, hidden_dim, 3)

    def backbone_parameters(self) -> list[nn.Parameter]:
        """The backbone's parameters (recipes give them a smaller learning rate)."""
        return list(self.backbone.parameters())

    def forward(self, images: Tensor, pixel_mask: Tensor | None = None) -> dict:
        """images ``(B, 3, H, W)``, pixel_mask ``(B, H, W)`` bool (True = real) -> outputs dict."""
        features, masks = self.backbone.forward_features(images, pixel_mask, return_masks=True)
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


def build_segmenter(num_classes: int, **options: Any) -> ClusterFormerSegmenter:
    """The registry's builder for ``instance``, ``semantic`` and ``panoptic``: ``options`` mixes
    backbone options and :data:`SEGMENTER_OPTIONS`; unset decoder sizes follow
    :func:`clusterformer.models.detector.default_detector_options`."""
    own = {k: options.pop(k) for k in list(options) if k in SEGMENTER_OPTIONS}
    return ClusterFormerSegmenter(num_classes, options, **{**default_detector_options(options), **own})
