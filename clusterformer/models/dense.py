"""What the detector and the segmenter share: any backbone -> pixel decoder -> clustering
decoder, and the typed options of that decoder (:class:`DecoderOptions`).

The backbone is any module that follows the backbone contract of
:mod:`clusterformer.models.backbones` (``feature_info`` with maps at strides 4, 8, 16, 32 and
``forward_pyramid(images, pixel_mask)``, read by :func:`~.backbones.backbone_maps`): the ClusterFormer backbone or a
timm ``features_only`` model behind :class:`~clusterformer.models.timm_backbone.TimmBackbone`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

from torch import nn

from clusterformer.models.backbones import feature_channels
from clusterformer.models.cluster_decoder import ClusterDecoder
from clusterformer.models.pixel_decoder import build_pixel_decoder


def _option(help: str, flat: str | None = None) -> Any:  # noqa: A002 - the field's help text
    """A decoder option, unset (``None``: the default for the backbone) unless given.
    ``flat`` is its name in a flat option dict (``create_model`` overrides, checkpoints)."""
    return field(default=None, metadata={"help": help, **({"flat": flat} if flat else {})})


@dataclass
class DecoderOptions:
    """Options of the dense heads (``model.decoder`` in a training config). ``None`` means the
    default, which for the sizes depends on the backbone (:meth:`resolved`)."""

    hidden_dim: int | None = _option("decoder width D (divisible by 4 and by heads); default "
                                     "256 for tiny/small-sized backbones, 64 for nano")
    num_queries: int | None = _option("cluster centers Q (detections / masks per image; 100)")
    layers: int | None = _option("clustering decoder layers (6)", "decoder_layers")
    heads: int | None = _option("attention heads of the decoder (8; 4 for nano)", "decoder_heads")
    ffn_dim: int | None = _option("decoder FFN width (2048; 256 for nano)", "decoder_ffn_dim")
    num_iters: int | None = _option("recurrent clustering iterations T per layer (3)",
                                    "decoder_num_iters")
    m_step: str | None = _option("decoder M-step: mean (soft k-means, default) or sum",
                                 "decoder_m_step")
    center_update: str | None = _option("decoder center update (Table S1c): recurrent, "
                                        "vanilla_attention, kmeans, cosine, criss_cross",
                                        "decoder_center_update")
    dispatching: str | None = _option("decoder dispatching (Table S1e): ours, none, fc, "
                                      "confidence, fc_similarity", "decoder_dispatching")
    query_init: str | None = _option("center initialisation (Table S1f): encoder (default), "
                                     "free, feature_embedding, mixed, scene_adaptive")
    head_dim: int | None = _option("channels per head of the clustering's queries and keys "
                                   "(Table S1d); default hidden_dim / heads", "decoder_head_dim")
    iterative_refinement: bool | None = _option("detection: each layer refines the previous "
                                                "layer's boxes (true)")
    pixel_decoder: str | None = _option("pixel decoder: fpn (default) or msdeform")
    pixel_decoder_layers: int | None = _option("msdeform pixel decoder layers (6)")
    masked_attention: bool | None = _option("segmentation: each center clusters only the pixels "
                                            "of its previous mask (false)")

    @staticmethod
    def flat_names() -> dict[str, str]:
        """Field name -> its name in a flat option dict (``decoder_layers`` for ``layers``)."""
        return {f.name: f.metadata.get("flat", f.name) for f in fields(DecoderOptions)}

    @classmethod
    def pop_flat(cls, options: dict[str, Any]) -> DecoderOptions:
        """Take the decoder options out of a flat dict (removing them from it)."""
        return cls(**{name: options.pop(flat) for name, flat in cls.flat_names().items()
                      if flat in options})  # fmt: skip

    def resolved(self, backbone_channels: int) -> DecoderOptions:
        """Every unset option filled in: DINO's 256-wide decoder for a backbone whose last map
        has at least 512 channels, a 64-wide one for CPU-sized backbones (nano)."""
        big = backbone_channels >= 512
        defaults = DecoderOptions(
            hidden_dim=256 if big else 64, num_queries=100, layers=6, heads=8 if big else 4,
            ffn_dim=2048 if big else 256, num_iters=3, m_step="mean", center_update="recurrent",
            dispatching="ours", query_init="encoder", iterative_refinement=True,
            pixel_decoder="fpn", pixel_decoder_layers=6, masked_attention=False,
        )
        given = {f.name: getattr(self, f.name) for f in fields(self)
                 if getattr(self, f.name) is not None}  # fmt: skip
        return replace(defaults, **given)


class DenseModel(nn.Module):
    """Backbone + pixel decoder + clustering decoder: the part every dense head shares.

    Args:
        backbone: a module following the backbone contract (its classifier, if any, unused).
        decoder: the options, already :meth:`DecoderOptions.resolved`.
        num_logits: class-head outputs (``C``, or ``C + 1`` with a no-object class).
        box_head, no_object, mask_features: see :class:`ClusterDecoder` and the pixel decoders.
    """

    def __init__(self, backbone: nn.Module, decoder: DecoderOptions, num_logits: int, *,
                 box_head: bool, no_object: bool, mask_features: bool) -> None:  # fmt: skip
        super().__init__()
        self.backbone = backbone
        if hasattr(backbone, "head_norm"):
            # The classifier's pooled-feature norm is never used by a dense model; dropping it
            # keeps every parameter trained (DDP without find_unused_parameters).
            backbone.head_norm = nn.Identity()
        self.default_cfg = dict(getattr(backbone, "default_cfg", {}) or {})
        self.pixel_decoder = build_pixel_decoder(
            decoder.pixel_decoder, feature_channels(backbone), decoder.hidden_dim,
            mask_features=mask_features, num_layers=decoder.pixel_decoder_layers,
            num_heads=decoder.heads,
        )
        self.decoder = ClusterDecoder(
            decoder.hidden_dim, num_logits, num_queries=decoder.num_queries,
            num_layers=decoder.layers, num_heads=decoder.heads, ffn_dim=decoder.ffn_dim,
            num_iters=decoder.num_iters, m_step=decoder.m_step,
            center_update=decoder.center_update, dispatching=decoder.dispatching,
            query_init=decoder.query_init, head_dim=decoder.head_dim,
            iterative_refinement=bool(decoder.iterative_refinement) and box_head,
            box_head=box_head, no_object=no_object,
        )

    def backbone_parameters(self) -> list[nn.Parameter]:
        """The backbone's parameters (recipes give them a smaller learning rate)."""
        return list(self.backbone.parameters())
