"""Loading a backbone's weights, the one way for every source: a state dict file
(``--backbone-weights FILE``, e.g. ImageNet weights saved by timm or torchvision), another run's
checkpoint (``--pretrained RUN``, any task: heads are never copied) and the backbone's own
published weights (``--backbone-weights timm``).

The rules come from the backbone module (the contract in :mod:`.backbones`): its weights are
its ``state_dict()`` without the modules it names in ``classifier_modules``; published weights
come from its ``pretrained_weights()``. Names need not match exactly: a file saved from a
wrapper (``backbone.``, ``module.``) or from the wrapped model alone (a timm model inside
:class:`~clusterformer.models.timm_backbone.TimmBackbone`) is renamed by the one prefix change
that makes most of its names the backbone's. Then every backbone tensor must be there, with its
shape and finite; anything else in the file (a classifier, a decoder) is ignored.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch
from torch import Tensor, nn

# ``--backbone-weights`` value asking for the backbone's published weights (timm's).
PUBLISHED_WEIGHTS = "timm"


def backbone_of(model: nn.Module) -> nn.Module:
    """The backbone of ``model``: its ``backbone`` attribute, or ``model`` itself when it is a
    backbone with its own classifier (a ClusterFormer classifier)."""
    return getattr(model, "backbone", model)


def backbone_tensors(backbone: nn.Module) -> dict[str, Tensor]:
    """``backbone``'s weights: its state dict without its ``classifier_modules``."""
    skip = tuple(f"{name}." for name in getattr(backbone, "classifier_modules", ()))
    return {k: v for k, v in backbone.state_dict().items() if not k.startswith(skip)}


def read_state_dict(path: Path) -> dict[str, Tensor]:
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


def _suffixes(name: str) -> list[tuple[str, str]]:
    """``(prefix, rest)`` for every split of a dotted name whose rest has two parts or more."""
    parts = name.split(".")
    return [(".".join(parts[:i]) + "." if i else "", ".".join(parts[i:]))
            for i in range(len(parts) - 1)]  # fmt: skip


def align_names(own: set[str], theirs: dict[str, Tensor]) -> dict[str, Tensor]:
    """``theirs`` renamed so that most of its names are in ``own``: one prefix taken off and/or
    one put on (``backbone.body.x`` -> ``body.x``, ``conv1.weight`` -> ``body.conv1.weight``),
    the change most names agree on; names it does not fit are left out."""
    own_prefixes: dict[str, set[str]] = {}
    for name in own:
        for prefix, rest in _suffixes(name):
            own_prefixes.setdefault(rest, set()).add(prefix)
    votes: Counter[tuple[str, str]] = Counter()
    for name in theirs:
        for prefix, rest in _suffixes(name):
            for put_on in own_prefixes.get(rest, ()):
                votes[(prefix, put_on)] += 1
    best: dict[str, Tensor] = {k: v for k, v in theirs.items() if k in own}
    for (taken_off, put_on), _ in votes.most_common(4):
        renamed = {put_on + k[len(taken_off):]: v for k, v in theirs.items() if k.startswith(taken_off)}
        renamed = {k: v for k, v in renamed.items() if k in own}
        if len(renamed) > len(best):
            best = renamed
    return best


def load_backbone_state(model: nn.Module, tensors: dict[str, Tensor], *, source: str) -> int:
    """Load ``tensors`` (named as in any model holding this backbone, or as the backbone alone)
    into ``model``'s backbone; ``source`` names them in messages. Returns the number loaded.

    Raises:
        ValueError: a backbone tensor is missing, has another shape, or holds NaN/infinity.
    """
    target = backbone_of(model)
    wanted = backbone_tensors(target)
    found = align_names(set(wanted), tensors)
    missing = sorted(set(wanted) - set(found))
    if missing:
        raise ValueError(f"{source}: backbone tensor {missing[0]} is missing ({len(found)} of "
                         f"{len(wanted)} found); are these weights of this --model's backbone?")  # fmt: skip
    for name in sorted(wanted):
        theirs, ours = tuple(found[name].shape), tuple(wanted[name].shape)
        if theirs != ours:
            raise ValueError(f"{source}: backbone tensor {name} is {theirs} there, {ours} in this "
                             "model: the backbone does not fit this model (another --model?)")  # fmt: skip
        if found[name].is_floating_point() and not bool(torch.isfinite(found[name]).all()):
            raise ValueError(f"{source}: backbone tensor {name} holds NaN or infinity (a diverged "
                             "run?); use other weights or an earlier checkpoint")  # fmt: skip
    target.load_state_dict({k: found[k] for k in wanted}, strict=False)
    return len(wanted)


def load_backbone_weights(model: nn.Module, source: str | Path) -> int:
    """Initialise ``model``'s backbone from ``source``: a weights file (``.safetensors``, or a
    state dict read with ``weights_only=True``; a clusterformer checkpoint is one) or
    :data:`PUBLISHED_WEIGHTS` (``"timm"``: the backbone's ``pretrained_weights()``). Returns
    the number of tensors loaded.

    Raises:
        FileNotFoundError: no such file. ValueError: unreadable, or weights that do not fit.
    """
    if str(source) == PUBLISHED_WEIGHTS:
        backbone = backbone_of(model)
        published = getattr(backbone, "pretrained_weights", None)
        if published is None:
            raise ValueError(f"--backbone-weights {PUBLISHED_WEIGHTS}: {type(backbone).__name__} "
                             "has no published weights (only a timm/<name> model has); give a "
                             "weights file")  # fmt: skip
        return load_backbone_state(model, published(), source=f"{PUBLISHED_WEIGHTS}'s weights")
    path = Path(source)
    return load_backbone_state(model, read_state_dict(path), source=str(path))
