"""The flags of the training config (``cf train``'s), derived from its fields: one per setting.

Every leaf of :class:`~clusterformer.engine.config.TrainConfig` is a flag named after it
(``--batch-size`` for ``data.batch_size``) unless its field names another (``--data`` for
``data.train``, ``--schedule`` for ``schedule.kind``, ``--decoder-layers`` for
``model.decoder.layers``); every option of every registered task is one too (``--num-points``;
an option several tasks share is one flag). The help of each says its config key and default,
so ``cf train --help-all`` lists the whole config. A flag left out is "not given": the recipe's or
config file's value, else the default, stays.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from functools import cache
from typing import Any, get_args, get_origin, get_type_hints

from clusterformer.engine.config import default_of, flag_name, leaves
from clusterformer.models.backbones import BackboneOptions
from clusterformer.models.dense import DecoderOptions

SCALARS = (bool, int, float, str)


@dataclass
class Flag:
    """One flag: its identifier and name, the config keys it sets and how to show it."""

    ident: str
    flag: str
    keys: list[str]
    kind: type
    help: str
    defaults: list[str] = field(default_factory=list)


def _scalar_kind(hint: Any) -> type:
    """``bool``/``int``/``float``/``str`` for a scalar hint, ``str`` for lists (parsed later)."""
    args = [a for a in get_args(hint) if a is not type(None)] or [hint]
    kind = args[0]
    return kind if kind in SCALARS and get_origin(kind) is None else str


def _show(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, tuple | list):
        return ",".join(str(v) for v in value)
    return str(value).lower() if isinstance(value, bool) else str(value)


def _derive_flags(task_names: tuple[str, ...]) -> list[Flag]:
    from clusterformer.tasks import task_spec

    flags: dict[str, Flag] = {}

    def add(key: str, f: Any, hint: Any, owner: str | None = None) -> None:
        name = flag_name(f)
        default = f"{owner}: {_show(default_of(f))}" if owner else _show(default_of(f))
        if name in flags:  # an option several tasks share: one flag
            flags[name].keys.append(key)
            flags[name].defaults.append(default)
            return
        flags[name] = Flag(name[2:].replace("-", "_"), name, [key], _scalar_kind(hint),
                           f.metadata.get("help", ""), [default])

    for path, f, hint in leaves():
        add(".".join(path), f, hint)
    flags["--task"] = Flag("task", "--task", ["task.name"], str,
                           f"the task: {', '.join(task_names)}", ["the recipe's"])
    for name in task_names:
        spec = task_spec(name)
        hints = get_type_hints(spec.options)
        for f in spec.option_fields().values():
            add(f"task.{f.name}", f, hints[f.name], owner=name)
    return list(flags.values())


@cache
def _cached_flags(task_names: tuple[str, ...]) -> tuple[Flag, ...]:
    return tuple(_derive_flags(task_names))


def config_flags() -> list[Flag]:
    """Every flag of the training config, in config order (task options last)."""
    from clusterformer.tasks import task_names

    return list(_cached_flags(tuple(task_names())))


def _model_option(key: str) -> bool:
    """Whether ``key`` is a backbone or decoder option (unset: the model's own value)."""
    section, _, name = key.rpartition(".")
    kinds = {"model.backbone": BackboneOptions, "model.decoder": DecoderOptions}
    return section in kinds and name in {f.name for f in fields(kinds[section])}


def default_phrase(flag: Flag) -> str | None:
    """``"default X"`` (per task for task options, once when every task has the same); None
    for an unset default whose help says what unset means (``"... (default: bf16 on CUDA,
    none on CPU)"``): "default unset" beside it would contradict the text."""
    unset = all(d == "unset" or d.endswith(": unset") for d in flag.defaults)
    if unset and "default" in flag.help.lower():
        return None
    if unset and all(_model_option(key) for key in flag.keys):
        return "default: the model's own, shown by --print-config"
    owned = [d.partition(": ") for d in flag.defaults]
    if len(owned) > 1 and all(sep for _, sep, _ in owned) and len({v for *_, v in owned}) == 1:
        return f"default {owned[0][2]} ({', '.join(owner for owner, _, _ in owned)})"
    return "default " + "; ".join(flag.defaults)


def help_text(flag: Flag, text: str | None = None) -> str:
    """The flag's help (or ``text``), its config key(s) and its default."""
    keys = " / ".join(sorted(set(flag.keys)))
    phrase = default_phrase(flag)
    return f"{text or flag.help} ({keys}{'; ' + phrase if phrase else ''})"


def flag_settings(values: dict[str, Any]) -> dict[str, Any]:
    """Given flag values (by identifier: ``batch_size``, ``mixup``, ``decoder_layers``; ``None``
    = not given) as dotted config keys. A task option shared by several tasks sets
    ``task.<option>``, which the chosen task then checks.

    Raises:
        ValueError: an identifier that is no flag of the config.
    """
    flags = {f.ident: f for f in config_flags()}
    unknown = sorted(set(values) - set(flags))
    if unknown:
        raise ValueError(f"unknown training option(s): {', '.join(unknown)}")
    return {flags[k].keys[0]: v for k, v in values.items() if v is not None}
