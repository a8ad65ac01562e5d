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

from clusterformer.models.backbone import ClusterFormer
from clusterformer.models.cluster_decoder import ClusterDecoder
from clusterformer.models.pixel_decoder import build_pixel_decoder

# Options of the detector itself; everything else goes to the backbone.
DETECTOR_OPTIONS: tuple[str, ...] = (
    "hidden_dim", "num_queries", "decoder_layers", "decoder_heads", "decoder_ffn_dim",
    "decoder_num_iters", "decoder_m_step", "decoder_center_update", "decoder_dispatching",
    "query_init", "iterative_refinement", "pixel_decoder", "pixel_decoder_layers", "mask_features",
)


class ClusterFormerDetector(nn.Module):
    """Backbone + pixel decoder + clustering decoder.

    Args:
        num_classes: object classes ``C``.
        backbone: options of :class:`ClusterFormer` (its classifier is not built).
        hidden_dim: decoder width ``D`` (divisible by 4 and by ``decoder_heads``).
        num_queries: ``Q`` cluster centers / detections per image.
        decoder_layers, decoder_heads, decoder_ffn_dim: decoder shape.
        decoder_num_iters: ``T`` of the decoder's recurrent clustering.
        decoder_m_step, decoder_center_update, decoder_dispatching, query_init,
            iterative_refinement: see :mod:`clusterformer.models.cluster_decoder`.
        pixel_decoder: ``"fpn"`` (default) or ``"msdeform"``; pixel_decoder_layers: its depth
            (``msdeform`` only).
        mask_features: also compute the stride-4 mask features (segmentation heads use them).
    """

    def __init__(
        self, num_classes: int, backbone: dict[str, Any], *, hidden_dim: int = 256,
        num_queries: int = 100, decoder_layers: int = 6, decoder_heads: int = 8,
        decoder_ffn_dim: int = 1024, decoder_num_iters: int = 3, decoder_m_step: str = "mean",
        decoder_center_update: str = "recurrent", decoder_dispatching: str = "ours",
        query_init: str = "encoder", iterative_refinement: bool = True,
        pixel_decoder: str = "fpn", pixel_decoder_layers: int = 6, mask_features: bool = False,
    ) -> None:
        super().__init__()
        self.num_classes = int(num_classes)
        self.backbone = ClusterFormer(**{**backbone, "num_classes": 0})
        # The classifier's pooled-feature norm is never used by a dense model; dropping it keeps
        # every parameter of the detector trained (DDP without find_unused_parameters).
        self.backbone.head_norm = nn.Identity()
        self.default_cfg = {**self.backbone.default_cfg, "num_classes": self.num_classes}
        self.pixel_decoder = build_pixel_decoder(
            pixel_decoder, self.backbone.feature_channels, hidden_dim,
            mask_features=mask_features, num_layers=pixel_decoder_layers,
            num_heads=decoder_heads,
        )
        self.decoder = ClusterDecoder(
            hidden_dim, self.num_classes, num_queries=num_queries, num_layers=decoder_layers,
            num_heads=decoder_heads, ffn_dim=decoder_ffn_dim, num_iters=decoder_num_iters,
            m_step=decoder_m_step, center_update=decoder_center_update,
            dispatching=decoder_dispatching, query_init=query_init,
            iterative_refinement=iterative_refinement,
        )

    def backbone_parameters(self) -> list[nn.Parameter]:
        """The backbone's parameters (recipes give them a smaller learning rate)."""
        return list(self.backbone.parameters())

    def forward(self, images: Tensor, pixel_mask: Tensor | None = None) -> dict:
        """images ``(B, 3, H, W)``, pixel_mask ``(B, H, W)`` bool (True = real) -> outputs dict."""
        features, masks = self.backbone.forward_features(images, pixel_mask, return_masks=True)
        pyramid = self.pixel_decoder(features, masks)
        outputs = self.decoder(pyramid.features, pyramid.masks)
        if pyramid.mask_features is not None:
            outputs["mask_features"] = pyramid.mask_features
        return outputs


def default_detector_options(backbone: dict[str, Any]) -> dict[str, Any]:
    """Decoder sizes that fit a backbone: DINO's 256-wide, 6-layer decoder for tiny/small,
    a 64-wide one for CPU-sized backbones (nano)."""
    dims = tuple(backbone.get("dims", (96, 192, 384, 768)))
    if dims[-1] >= 512:
        return {"hidden_dim": 256, "decoder_heads": 8, "decoder_ffn_dim": 2048, "decoder_layers": 6}
    return {"hidden_dim": 64, "decoder_heads": 4, "decoder_ffn_dim": 256, "decoder_layers": 6}


def build_detector(num_classes: int, **options: Any) -> ClusterFormerDetector:
    """The registry's builder: ``options`` mixes backbone options (a preset's) and
    :data:`DETECTOR_OPTIONS`; unset detector options follow :func:`default_detector_options`."""
    detector = {k: options.pop(k) for k in list(options) if k in DETECTOR_OPTIONS}
    return ClusterFormerDetector(
        num_classes, options, **{**default_detector_options(options), **detector}
    )
