"""Config files and their merging: recipes (YAML files shipped in ``clusterformer/recipes``),
``--config FILE`` (YAML, TOML or JSON, e.g. a run's own ``config.yaml``), flags and
``--set a.b.c=VALUE``.

Order: the defaults, then the recipe or config file, then the flags, then ``--set`` in the
order given. Every layer is merged key by key into the nested settings: ``--set
model.decoder.num_queries=50`` changes that key and keeps the file's other decoder keys. One
choice is one: a given ``schedule.steps`` clears the file's ``schedule.epochs`` (and the
reverse). ``optim.lr`` means the same in every layer: the rate for a global batch of
``optim.lr_base_batch`` (:func:`~clusterformer.engine.loop.effective_lr`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from clusterformer.engine.checkpoint_format import CONFIG_JSON, CONFIG_YAML
from clusterformer.engine.config import ModelConfig, TrainConfig, build_config
from clusterformer.engine.model_settings import preset_settings, same_value

RECIPE_DIR = Path(__file__).resolve().parent.parent / "recipes"
CONFIG_SUFFIXES = (".yaml", ".yml", ".toml", ".json")

# Limits on a config's shape, checked before any Python object is built: a full config (every
# setting of every section, as RUN/config.yaml holds it) has about 100 values nested 4 deep, so
# these leave room for any real file while a YAML alias bomb (a few lines that expand to
# billions of values, which merging and writing the config would walk one by one) or a file
# nested thousands deep (a RecursionError in the parsers) stops here within a fraction of a
# second.
MAX_CONFIG_VALUES = 100_000  # values after expanding YAML aliases, keys included
MAX_CONFIG_DEPTH = 100  # nesting levels of lists and mappings


class ConfigShapeError(ValueError):
    """A config beyond :data:`MAX_CONFIG_VALUES` or :data:`MAX_CONFIG_DEPTH` (its message
    starts with the file, or ``--set KEY``)."""


class _TooDeep(Exception):
    pass


class _GuardedLoader(yaml.SafeLoader):
    """SafeLoader that stops composing past :data:`MAX_CONFIG_DEPTH` levels: PyYAML's composer
    recurses once per level, and its scanner slows quadratically with flow nesting, so
    waiting for the RecursionError of a ``[[[[...`` document would take a second or more."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth += 1
        try:
            if self._depth > MAX_CONFIG_DEPTH:
                raise _TooDeep
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _too_deep(where: str) -> ConfigShapeError:
    return ConfigShapeError(f"{where}: nested more than {MAX_CONFIG_DEPTH} levels deep; a "
                            "config has a few (sections of settings)")  # fmt: skip


def _measure(node: yaml.Node, depth: int, seen: dict[int, tuple[int, int]], open_: set[int],
             where: str) -> tuple[int, int]:  # fmt: skip
    """``(values, height)`` of ``node`` with its aliases expanded. An alias is the same node
    object as its anchor, so memoising by id measures each once: a bomb costs its line count.
    The depth limit bounds this recursion."""
    if depth > MAX_CONFIG_DEPTH:
        raise _too_deep(where)
    key = id(node)
    if key in seen:
        size, height = seen[key]
        if depth + height > MAX_CONFIG_DEPTH:
            raise _too_deep(where)
        return size, height
    if key in open_:  # ``&a [*a]``: the constructed value would contain itself
        raise ConfigShapeError(f"{where}: a YAML alias refers to a value that contains it")
    if isinstance(node, yaml.MappingNode):
        children = [child for pair in node.value for child in pair]
    elif isinstance(node, yaml.SequenceNode):
        children = node.value
    else:
        children = []
    open_.add(key)
    size, height = 1, 0
    for child in children:
        child_size, child_height = _measure(child, depth + 1, seen, open_, where)
        size, height = size + child_size, max(height, child_height + 1)
        if size > MAX_CONFIG_VALUES:
            raise ConfigShapeError(f"{where}: expands to more than {MAX_CONFIG_VALUES:,} "
                                   "values through YAML aliases (&anchor / *alias); a config "
                                   "has about a hundred")  # fmt: skip
    open_.discard(key)
    seen[key] = (size, height)
    return size, height


def load_yaml(text: str, where: str) -> Any:
    """``yaml.safe_load(text)`` within :data:`MAX_CONFIG_VALUES` and :data:`MAX_CONFIG_DEPTH`
    (ValueError starting with ``where`` beyond them; ``yaml.YAMLError`` for bad YAML)."""
    loader = _GuardedLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _measure(node, 1, {}, set(), where)
        return loader.construct_document(node)
    except (_TooDeep, RecursionError):
        raise _too_deep(where) from None
    finally:
        loader.dispose()


def check_nesting(values: Any, where: str) -> None:
    """ValueError starting with ``where`` when ``values`` (lists and dicts, as JSON and TOML
    give) nest deeper than :data:`MAX_CONFIG_DEPTH` or hold more than
    :data:`MAX_CONFIG_VALUES` values."""
    stack, count = [(values, 1)], 0
    while stack:  # a loop, not recursion: the depth is what is being checked
        value, depth = stack.pop()
        count += 1
        if depth > MAX_CONFIG_DEPTH:
            raise _too_deep(where)
        if count > MAX_CONFIG_VALUES:
            raise ConfigShapeError(f"{where}: holds more than {MAX_CONFIG_VALUES:,} values; "
                                   "a config has about a hundred")  # fmt: skip
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)


def recipe_names() -> list[str]:
    """The shipped recipes (``clusterformer/recipes/<name>.yaml``)."""
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def recipe_summaries() -> dict[str, str]:
    """Recipe name -> its task and the first line of its opening comment."""
    out = {}
    for name in recipe_names():
        path = RECIPE_DIR / f"{name}.yaml"
        text = path.read_text(encoding="utf-8")
        first = next((line[1:].strip() for line in text.splitlines() if line.startswith("#")), "")
        task = (load_yaml(text, str(path)) or {}).get("task", {}).get("name", "?")
        out[name] = f"{task}: {first}" if first else str(task)
    return out


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The nested settings of a YAML, TOML or JSON config file (errors name the file)."""
    path = Path(path)
    if path.suffix not in CONFIG_SUFFIXES:
        raise ValueError(f"{path}: a config file ends in {', '.join(CONFIG_SUFFIXES)}")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: config file not found") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text") from None
    try:
        if path.suffix == ".json":
            values = json.loads(text)
        elif path.suffix == ".toml":
            import tomllib  # Python >= 3.11

            values = tomllib.loads(text)
        else:
            values = load_yaml(text, str(path))
    except ImportError:
        raise ValueError(f"{path}: TOML configs need Python 3.11 or later; use YAML") from None
    except RecursionError:  # json and tomllib recurse once per nesting level
        raise _too_deep(str(path)) from None
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML ({_reason(exc)})") from None
    except ConfigShapeError:
        raise
    except ValueError as exc:
        raise ValueError(f"{path}: not valid {path.suffix[1:].upper()} ({_reason(exc)})") from None
    if path.suffix in (".json", ".toml"):  # load_yaml measured the YAML before building it
        check_nesting(values, str(path))
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of settings at the top")
    return values


def _reason(exc: Exception) -> str:
    return " ".join(str(exc).split())[:200]


def read_recipe(name: str) -> dict[str, Any]:
    """The settings of recipe ``name`` (ValueError naming the recipes otherwise)."""
    if name not in recipe_names():
        raise ValueError(f"unknown recipe '{name}'; choose one of {', '.join(recipe_names())}")
    return {**read_config_file(RECIPE_DIR / f"{name}.yaml"), "recipe": name}


def parse_set(item: str) -> tuple[str, Any]:
    """``"a.b.c=VALUE"`` -> ``("a.b.c", value)``, VALUE read as YAML (``50``, ``[0.5, 2]``,
    ``null``, ``free``)."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ValueError(f"--set {item!r}: expected KEY=VALUE with a dotted key, e.g. "
                         "model.decoder.num_queries=50")  # fmt: skip
    try:
        value = load_yaml(raw, f"--set {key}") if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


def nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    """``{"a.b": 1, "a.c": 2}`` -> ``{"a": {"b": 1, "c": 2}}``."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"{key}: {part} is a setting, not a section")
            node = child
        node[leaf] = value
    return out


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``over``'s keys set, section by section (a new dict; neither changes)."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def resolve_config(recipe: str | None = None, config: str | Path | None = None,
                   sets: Iterable[str] = (), overrides: Mapping[str, Any] | None = None,
                   **flags: Any) -> TrainConfig:  # fmt: skip
    """Defaults <- ``recipe`` or ``config`` file <- ``overrides`` (dotted keys, e.g.
    ``{"schedule.steps": 10}``) and ``flags`` (``cf train``'s flags by identifier, e.g.
    ``steps=10``, ``batch_size=2``, ``decoder_layers=3``) <- ``sets`` (``"a.b.c=VALUE"``).
    ``None`` values are "not given".

    Raises:
        ValueError: unknown recipe, key or value; a bad file; steps and epochs both given.
    """
    if recipe is not None and config is not None:
        raise ValueError("give a --recipe or a --config file, not both")
    from clusterformer.engine.config_flags import flag_settings

    given = {**dict(overrides or {}), **flag_settings(flags)}
    given = {k: v for k, v in given.items() if v is not None}
    for item in sets:
        key, value = parse_set(item)
        given[key] = value
    if recipe is None and config is None:
        config = resumed_config_file(given)
    layer = read_recipe(recipe) if recipe is not None else (
        read_config_file(config) if config is not None else {})
    layer.pop("run", None)  # a run's config.json: what the run resolved, not settings
    if given.get("schedule.steps") is not None and given.get("schedule.epochs") is not None:
        raise ValueError("give either --steps or --epochs, not both")
    cleared = {}
    if "schedule.steps" in given and "schedule.epochs" not in given:
        cleared["schedule.epochs"] = None
    if "schedule.epochs" in given and "schedule.steps" not in given:
        cleared["schedule.steps"] = None
    layer = without_preset_values(layer, given)
    merged = deep_merge(deep_merge(layer, nest(cleared)), nest(given))
    return build_config(merged)


def without_preset_values(layer: Mapping[str, Any], given: Mapping[str, Any]) -> dict[str, Any]:
    """``layer`` (a recipe or file) without the model settings that are only its model's
    resolved values, when ``given`` (flags, ``--set``) names another model: a printed config
    spells out nano's depths, and ``--model clusterformer-tiny`` beside it must build tiny,
    not tiny named but nano-sized. A value that differs from the preset's was a choice and
    stays."""
    model = layer.get("model") if isinstance(layer.get("model"), Mapping) else {}
    task = layer.get("task") if isinstance(layer.get("task"), Mapping) else {}
    old_model, old_task = model.get("name") or ModelConfig.name, task.get("name")
    if old_task is None or given.get("model.name", old_model) == old_model:
        return dict(layer)
    sections = {k: model[k] for k in ("backbone", "decoder") if isinstance(model.get(k), Mapping)}
    dims = (sections.get("backbone") or {}).get("dims")
    backbone, decoder = preset_settings(str(old_model), str(old_task),
                                        tuple(dims) if isinstance(dims, list) else None)
    presets = {"backbone": backbone, "decoder": decoder}
    kept = {key: {k: v for k, v in values.items()
                  if v is None or k not in presets[key] or not same_value(v, presets[key][k])}
            for key, values in sections.items()}  # fmt: skip
    return {**layer, "model": {**model, **kept}}


def resumed_config_file(given: Mapping[str, Any]) -> Path | None:
    """The settings file of the run a ``--resume`` without ``--recipe`` / ``--config``
    continues: ``RUN/config.yaml`` (else ``RUN/config.json``) of ``runtime.out``; None when
    ``given`` does not resume or the folder records no settings (a run not started yet).

    ``cf train --out RUN --resume`` needs nothing else, as ultralytics' ``resume=True`` does:
    the run's own settings are the base layer, and a flag given beside ``--resume`` changes
    only its key (a changed task, model, image size or class count is then refused by the
    checkpoint check, a changed ``--steps`` extends the run)."""
    out = given.get("runtime.out")
    if given.get("runtime.resume") is not True or out is None:
        return None
    folder = Path(str(out))
    for name in (CONFIG_YAML, CONFIG_JSON):
        if (folder / name).is_file():
            return folder / name
    return None


# The keys of a command, not of a run: a config file never holds them.
ACTIONS = ("resume", "restart")


def settings(cfg: TrainConfig) -> dict[str, Any]:
    """The run's settings as written to ``RUN/config.yaml`` / ``config.json`` and printed by
    ``--print-config``: every value resolved, without ``runtime.resume`` / ``restart`` (what
    one command does with the folder, not how the run trains: ``cf train --config FILE --out
    NEW`` repeats the run)."""
    values = cfg.to_dict()
    values["runtime"] = {k: v for k, v in values["runtime"].items() if k not in ACTIONS}
    return values


LR_NOTE = ("# optim.lr is the peak lr for a global batch of optim.lr_base_batch images, scaled "
           "linearly to the\n# run's global batch (batch_size x processes x accum_steps); "
           "without lr_base_batch, used as is.\n")


class _Dumper(yaml.SafeDumper):
    """Lists on one line (``depths: [1, 1, 2, 1]``), sections as blocks."""


_Dumper.add_representer(list, lambda dumper, value: dumper.represent_sequence(
    "tag:yaml.org,2002:seq", value, flow_style=True))


def to_yaml(cfg: TrainConfig) -> str:
    """:func:`settings` as YAML, after a comment stating the lr rule (a value edited in the
    file means what ``--lr`` and ``--set optim.lr`` mean)."""
    return LR_NOTE + yaml.dump(settings(cfg), Dumper=_Dumper, sort_keys=False,
                               default_flow_style=False, width=100)  # fmt: skip
