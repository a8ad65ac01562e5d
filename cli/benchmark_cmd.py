"""``cf benchmark``: inference and training-step speed of presets and timm peers, one process."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

from clusterformer.cli.errors import UserError
from clusterformer.cli.options import Amp, BatchSize, flag_errors

MODES = {"both": ("infer", "train"), "infer": ("infer",), "train": ("train",)}
RUNTIMES = ("eager", "onnxruntime")
# Rich markup would read "[timm]" in help and notes as a style tag and drop it.
TIMM_HINT = "pip install 'clusterformer\\[timm]'"


def register(app: typer.Typer) -> None:
    app.command("benchmark")(benchmark_command)


def benchmark_command(
    models: Annotated[list[str], typer.Option("--model", help="A preset, a preset with overrides (clusterformer-tiny:num_iters=1, ...:grad_checkpointing=true) or timm/<name>; repeat to compare several.")] = ["clusterformer-tiny"],  # noqa: B006 - Typer copies list defaults
    peers: Annotated[bool, typer.Option("--peers", help=f"Add timm's Swin-T, ConvNeXt-T and ResNet-50 (skipped with a note when timm is not installed: {TIMM_HINT}). The ratio column then compares with Swin-T.")] = False,
    baseline: Annotated[str | None, typer.Option("--baseline", help="The model the ratio column compares with (default: Swin-T with --peers, else the first --model).")] = None,
    compile_model: Annotated[bool, typer.Option("--compile/--no-compile", help="Also time every model under torch.compile (inference with frozen weights).")] = False,
    runtime: Annotated[str, typer.Option("--runtime", help="eager, or onnxruntime: also export every model as cf export --image-size S writes it and time its ONNX Runtime session (inference, --threads intra-op threads, float32), interleaved with the eager rows; a note when the export extra is not installed (pip install 'clusterformer\\[export]').")] = "eager",
    mode: Annotated[str, typer.Option("--mode", help="infer, train or both.")] = "both",
    batch_size: BatchSize = 8,
    image_size: Annotated[int, typer.Option("--image-size", help="Square input side in pixels.")] = 224,
    rounds: Annotated[int, typer.Option("--rounds", help="Timed rounds; each times one call of every model, interleaved.")] = 8,
    warmup: Annotated[int, typer.Option("--warmup", help="Untimed calls per model first.")] = 2,
    amp: Amp = "none",
    threads: Annotated[list[int] | None, typer.Option("--threads", help="Thread counts to measure, e.g. --threads 1 --threads 2 (default: cf --threads, OMP_NUM_THREADS, else one per core).")] = None,
    device: Annotated[str, typer.Option("--device", help="cpu, cuda or cuda:N: what is measured (CPU unless asked, so a CUDA machine still reports CPU numbers by default).")] = "cpu",
    memory: Annotated[bool, typer.Option("--memory/--no-memory", help="Peak memory per model (CPU: each eager model once more in its own process).")] = True,
    out: Annotated[Path, typer.Option("--out", help="Write every row and the machine here (JSON).")] = Path("benchmark.json"),
) -> None:
    """Time inference and the training step (forward, backward, AdamW) of models side by
    side in ONE process: interleaved rounds, medians, ratios against a baseline, eager and
    (with --compile) compiled. Prints a table and writes JSON."""
    _check_flags(mode, amp, batch_size, image_size, rounds, warmup, threads)
    _check_runtime(runtime, mode, amp, device)
    from rich.console import Console

    from clusterformer.bench import (
        PEERS,
        BenchConfig,
        measure,
        parse_model,
        report,
        timm_available,
    )
    from clusterformer.cli.runtime_opts import start_compute

    console = Console()
    try:
        specs = [parse_model(m) for m in models]
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if peers:
        if timm_available():
            specs += [parse_model(p) for p in PEERS if p not in models]
            baseline = baseline or PEERS[0]
        else:
            console.print(f"note: timm is not installed, so no peers are timed ({TIMM_HINT})")
    if any(s.source == "timm" for s in specs) and not timm_available():
        raise UserError("timm/<name> models need timm: pip install 'clusterformer[timm]'")
    start_compute(device, threads[0] if threads else None)
    cfg = BenchConfig(batch_size=batch_size, image_size=image_size, rounds=rounds,
                      warmup=warmup, modes=MODES[mode], compile=compile_model, amp=amp,
                      device=device, threads=tuple(threads) if threads else None,
                      memory=memory)
    with console.status("benchmark") as status, _onnx_exports(runtime, cfg, console) as onnx:
        rows = measure(specs, cfg, baseline=baseline, onnx=onnx,
                       progress=lambda text: status.update(f"benchmark: {text}"))
    doc = report(rows, cfg)
    _print_table(console, doc)
    from clusterformer.engine.checkpoint import atomic_write_text

    atomic_write_text(out, json.dumps(doc, indent=2) + "\n")
    console.print(f"wrote {out}")


def _check_flags(mode: str, amp: str, batch_size: int, image_size: int, rounds: int,
                 warmup: int, threads: list[int] | None) -> None:  # fmt: skip
    """Usage errors (exit 2) before anything is imported or built."""
    if mode not in MODES:
        raise UserError(f"--mode must be one of {', '.join(MODES)}, got '{mode}'")
    from clusterformer.inference import check_settings

    with flag_errors():
        check_settings(amp=amp)
    for name, value, least in (("--batch-size", batch_size, 1), ("--image-size", image_size, 32),
                               ("--rounds", rounds, 1), ("--warmup", warmup, 1)):
        if value < least:
            raise UserError(f"{name} must be >= {least}, got {value}")
    if threads and min(threads) < 1:
        raise UserError(f"--threads must be >= 1, got {min(threads)}")


def _check_runtime(runtime: str, mode: str, amp: str, device: str) -> None:
    """Usage errors of --runtime (exit 2): ONNX Runtime rows are float32 CPU inference."""
    if runtime not in RUNTIMES:
        raise UserError(f"--runtime must be one of {', '.join(RUNTIMES)}, got '{runtime}'")
    if runtime == "eager":
        return
    if mode == "train":
        raise UserError("--runtime onnxruntime times inference; use --mode infer or both")
    if amp != "none":
        raise UserError("--runtime onnxruntime times the float32 graph cf export writes; "
                        "use --amp none")
    if not device.startswith("cpu"):
        raise UserError("--runtime onnxruntime times ONNX Runtime's CPU provider; use --device cpu")


@contextlib.contextmanager
def _onnx_exports(runtime: str, cfg, console) -> Iterator[object]:  # noqa: ANN001 - lazily imported types
    """The ONNX exports for ``--runtime onnxruntime`` (None: eager only, or a note when the
    export extra is missing), their folder removed afterwards."""
    if runtime != "onnxruntime":
        yield None
        return
    from clusterformer.export import missing_onnx_packages

    if missing := missing_onnx_packages():
        console.print(f"note: {', '.join(missing)} not installed, so no ONNX Runtime rows are "
                      "timed (pip install 'clusterformer\\[export]')")
        yield None
        return
    from clusterformer.bench.onnx_runtime import OnnxExports

    with OnnxExports(cfg) as exports:
        yield exports


def _print_table(console, doc: dict) -> None:  # noqa: ANN001 - rich Console, imported lazily
    from rich.table import Table

    machine = doc["machine"]
    console.print(f"{machine['cpu']} ({machine['cores']} cores), torch {machine['torch']}"
                  + (f", timm {machine['timm']}" if "timm" in machine else "")
                  + (f", {machine['gpu']}" if "gpu" in machine else ""))
    rows = doc["rows"]
    first = rows[0]
    console.print(f"batch {first['batch_size']}, {first['image_size']} px, amp {first['amp']}; "
                  f"medians of {first['rounds']} interleaved rounds; 'x base' is the median "
                  f"per-round speed ratio to {first['baseline']} (eager); MiB is peak memory")
    table = Table()
    for column in ("mode", "thr", "model", "GFLOPs", "img/s", "ms", "x base", "MiB"):
        table.add_column(column, justify="left" if column in ("mode", "model") else "right",
                         overflow="fold")
    for row in rows:
        label = row["model"] + (" compiled" if row["compiled"] else "")
        if row.get("runtime") == "onnxruntime":
            label += " onnxruntime"
        memory = row.get("peak_mem_mib") or row.get("peak_rss_mib")
        table.add_row(
            row["mode"], str(row["threads"]), label, f"{row['gflops']:.2f}",
            f"{row['img_per_s']:.2f}", f"{row['ms_median']:.0f}",
            f"{row['speed_vs_baseline']:.3f}", "-" if memory is None else f"{memory:.0f}",
        )
    console.print(table)
    from clusterformer.export import DEFAULT_TOLERANCE

    diffs = {row["model"]: row["onnx_max_rel_diff"] for row in rows if "onnx_max_rel_diff" in row}
    for model, diff in diffs.items():
        if not diff <= DEFAULT_TOLERANCE:
            console.print(f"warning: {model}'s ONNX graph differs from eager by {diff:.1e} "
                          f"(relative; cf export requires {DEFAULT_TOLERANCE:g})", markup=False)
