"""The model settings a run builds with when ``model.backbone`` / ``model.decoder`` leave them
unset: the preset's (or the backbone builder's) values, and the dense heads' defaults.

``--print-config`` and ``RUN/config.yaml`` show these resolved values instead of ``null``, so
a printed config says what the run builds (as detectron2's and mmengine's dumped configs do).
Only the options the model takes are resolved: a classifier has no decoder, so its decoder
keys stay unset, and the decoder's sizes stay unset for a backbone whose output width is
known only once it is built (a ``timm/`` model).
"""

from __future__ import annotations

import inspect
from dataclasses import fields
from typing import Any

from clusterformer.models.backbones import BackboneOptions, backbone_defaults, resolve_backbone
from clusterformer.models.dense import DecoderOptions
from clusterformer.models.registry import architecture_of

# Backbone widths on either side of DecoderOptions.resolved's threshold: a decoder option that
# resolves alike for both does not depend on the backbone.
_NARROW, _WIDE = 1, 1 << 20


def _builder_defaults(name: str) -> dict[str, Any]:
    """The keyword defaults of the function or class that builds backbone ``name``."""
    entry, variant = resolve_backbone(name)
    params = list(inspect.signature(entry.builder()).parameters.values())
    params = params[1:] if variant is not None else params  # a family's variant comes first
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}


def _resolved(name: str, accepted: frozenset[str],
              dims: tuple[int, ...] | None) -> tuple[tuple[tuple[str, Any], ...], ...]:  # fmt: skip
    backbone_fields = {f.name for f in fields(BackboneOptions)}
    values = {**_builder_defaults(name), **backbone_defaults(name)}
    backbone = {k: values[k] for k in sorted(backbone_fields & accepted) if k in values}
    flat = DecoderOptions.flat_names()
    dims = dims or backbone.get("dims")
    narrow, wide = DecoderOptions().resolved(_NARROW), DecoderOptions().resolved(_WIDE)
    exact = DecoderOptions().resolved(int(dims[-1])) if dims else None
    decoder = {}
    for f in fields(DecoderOptions):
        if flat[f.name] not in accepted:
            continue
        if exact is not None:
            decoder[f.name] = getattr(exact, f.name)
        elif getattr(narrow, f.name) == getattr(wide, f.name):
            decoder[f.name] = getattr(narrow, f.name)
    return tuple(backbone.items()), tuple(decoder.items())


def preset_settings(name: str, task: str, dims: tuple[int, ...] | None = None,
                    ) -> tuple[dict[str, Any], dict[str, Any]]:  # fmt: skip
    """``(backbone, decoder)``: the value of every ``model.backbone`` and ``model.decoder``
    option (by field name) that model ``name`` built for ``task`` takes and that a run leaving
    it unset builds with; ``dims``: the backbone widths set instead of the preset's (the
    decoder's default sizes follow them). ``({}, {})`` for a model or task not known (yet):
    building it then says what is wrong.
    """
    try:
        entry, variant = resolve_backbone(name)
        accepted = set(architecture_of(task).options)
    except (ValueError, KeyError, TypeError):
        return {}, {}
    accepted |= set(entry.option_names(family=variant is not None))
    backbone, decoder = _resolved(name, frozenset(accepted), tuple(dims) if dims else None)
    return dict(backbone), dict(decoder)


def same_value(a: Any, b: Any) -> bool:
    """Equal as settings: a list read from a file equals the preset's tuple."""
    as_list = (lambda v: list(v) if isinstance(v, tuple | list) else v)  # noqa: E731
    return as_list(a) == as_list(b)
