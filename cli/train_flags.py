"""``cf train``'s flags as Typer parameters (the flags themselves come from the training config:
:mod:`clusterformer.engine.config_flags`), and ``cf train --help-all``, the reference of every
setting.

``cf train --help`` shows the everyday flags (those of the command-line contract and a few
more), each with one short line; the other ninety-odd settings work the same but are listed
by ``--help-all`` only, one entry per setting with its config key, flag, default and full
help, wrapped to the terminal so that nothing is cut at 80 columns.
"""

from __future__ import annotations

import inspect
import textwrap
from collections.abc import Iterable

import typer

from clusterformer.engine.config_flags import Flag, default_phrase, help_text

# The flags `cf train --help` shows, with their short help (the config field's help is the
# long one, shown by --help-all).
EVERYDAY: dict[str, str] = {
    "--task": "classification, detection, instance, semantic or panoptic",
    "--data": "training data: a shard folder or a raw dataset folder",
    "--val-data": "held-out data, evaluated during and after training",
    "--out": "run folder: config.yaml, metrics.jsonl, checkpoints/",
    "--model": "clusterformer-nano, -tiny, -small or timm/<name> (cf models)",
    "--steps": "optimizer steps to train",
    "--epochs": "epochs to train (instead of --steps)",
    "--batch-size": "images per process per step",
    "--lr": "peak lr for a global batch of --lr-base-batch (scaled linearly)",
    "--lr-base-batch": "global batch --lr is given for; unset: --lr used as is",
    "--image-size": "training crop size in pixels",
    "--device": "cpu, cuda or cuda:N (default: CUDA when available)",
    "--amp": "bf16, fp16 or none (default: bf16 on CUDA, none on CPU)",
    "--compile": "torch.compile the model, checked against eager",
    "--resume": "continue --out from its newest checkpoint with its own settings",
    "--restart": "delete --out's checkpoints and logs, start at step 0",
    "--seed": "random seed",
    "--save-every": "also keep a checkpoint every this many steps",
    "--eval-every": "evaluate --val-data every this many steps (and at the end)",
}


def typer_parameters(flags: list[Flag]) -> list[inspect.Parameter]:
    """The flags as keyword parameters with ``typer.Option`` defaults (all ``None``: not given);
    those not in :data:`EVERYDAY` are hidden from ``--help``."""
    params = []
    order = list(EVERYDAY)
    for flag in sorted(flags, key=lambda f: order.index(f.flag) if f.flag in EVERYDAY else len(order)):
        names = (f"{flag.flag}/--no-{flag.flag[2:]}",) if flag.kind is bool else (flag.flag,)
        short = EVERYDAY.get(flag.flag)
        option = typer.Option(None, *names, help=help_text(flag, short), show_default=False,
                              hidden=short is None)  # fmt: skip
        params.append(inspect.Parameter(flag.ident, inspect.Parameter.KEYWORD_ONLY,
                                        default=option, annotation=flag.kind | None))  # fmt: skip
    return params


def reference_text(flags: Iterable[Flag], width: int) -> str:
    """``cf train --help-all``: every setting by section, as ``KEY  --flag`` and its help and
    default indented below, wrapped at ``width`` columns (at most 100)."""
    width = max(min(width, 100), 40)
    wrap = textwrap.TextWrapper(width=width, initial_indent="      ", subsequent_indent="      ",
                                break_long_words=False, break_on_hyphens=False)  # fmt: skip
    lines = textwrap.wrap("Every setting of cf train: its config key (for --config files and "
                          "--set KEY=VALUE), its flag, what it does and its default. Settings "
                          "merge key by key: the defaults, then --recipe or --config, then the "
                          "flags, then every --set.", width=width)  # fmt: skip
    section = None
    for flag in sorted(flags, key=lambda f: f.keys[0].split(".")[0] != "task"):
        top = flag.keys[0].split(".")[0]
        if top != section:
            section = top
            lines += ["", f"{section}:"]
        keys = " / ".join(sorted(set(flag.keys)))
        names = f"{flag.flag} / --no-{flag.flag[2:]}" if flag.kind is bool else flag.flag
        lines += textwrap.wrap(f"{keys}  {names}", width=width, initial_indent="  ",
                               subsequent_indent="    ", break_long_words=False)  # fmt: skip
        phrase = default_phrase(flag)
        lines += wrap.wrap(flag.help + (f" ({phrase})" if phrase else ""))
    return "\n".join(lines) + "\n"
