"""``cf export``: a checkpoint to ONNX or a ``torch.export`` program, checked against eager.

:func:`export_checkpoint` rebuilds the model from a checkpoint, traces the task's graph
(:mod:`.graph`), writes it with its metadata (:mod:`.writer`) to a temporary name beside
``out``, runs the parity check (:mod:`.parity`) on that file and only then renames it to
``out``. When parity fails the file is kept as ``<stem>.parity-failed<suffix>`` for
inspection (a previous file at ``out`` is removed: it no longer matches the checkpoint) and
:class:`ParityError` is raised.

Layering: ops <- models <- tasks <- engine <- export <- cli.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from clusterformer.export.parity import DEFAULT_TOLERANCE, ParityResult
from clusterformer.export.writer import (
    DEFAULT_OPSET,
    FORMATS,
    module_to_onnx,
    read_export_metadata,
)

__all__ = [
    "DEFAULT_OPSET", "DEFAULT_TOLERANCE", "FORMATS", "ExportResult", "ParityError",
    "ParityResult", "export_checkpoint", "missing_onnx_packages", "module_to_onnx",
    "read_export_metadata",
]


class ParityError(ValueError):
    """The exported model differs from eager beyond tolerance; ``results`` has the details."""

    def __init__(self, message: str, results: list[ParityResult]) -> None:
        super().__init__(message)
        self.results = results


@dataclass
class ExportResult:
    """What :func:`export_checkpoint` wrote and measured."""

    path: Path
    format: str
    task: str
    exporter: str
    output_names: tuple[str, ...]
    dynamic: bool
    fallback_reason: str | None = None
    parity: list[ParityResult] = field(default_factory=list)
    seconds: float = 0.0


def missing_onnx_packages() -> list[str]:
    """The packages of the ``export`` extra that ONNX export and its parity check need and
    cannot import."""
    missing = []
    for name in ("onnx", "onnxruntime", "onnxscript"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    return missing


def _check_onnx_available() -> None:
    if missing := missing_onnx_packages():
        raise ValueError(f"ONNX export needs {', '.join(missing)}: "
                         "pip install 'clusterformer[export]'")


def export_checkpoint(
    ckpt: str | Path,
    fmt: str,
    out: str | Path,
    *,
    image_size: int | None = None,
    with_postprocess: bool = False,
    opset: int = DEFAULT_OPSET,
    tolerance: float = DEFAULT_TOLERANCE,
    stage: Callable[[str], None] | None = None,
) -> ExportResult:
    """Export checkpoint ``ckpt`` (run folder or ``.safetensors``) to ``out``.

    Args:
        fmt: ``"onnx"`` or ``"pt2"``; ``out`` must end in ``.onnx`` / ``.pt2``.
        image_size: static ``S x S`` input (batch stays dynamic); ``None`` = dynamic H, W.
        with_postprocess: put the task's post-processing in the graph (see :mod:`.graph`).
        opset: ONNX opset (>= 17).
        tolerance: parity tolerance on the relative max difference (see :mod:`.parity`).
        stage: called with a short description as each step starts (progress display).

    Raises:
        FileNotFoundError / ValueError: bad checkpoint, format, path or option;
        ParityError: the written file does not match the eager model.
    """
    import torch

    from clusterformer.engine import files
    from clusterformer.engine.checkpoint import resolve_checkpoint
    from clusterformer.engine.evaluate import load_model_from_checkpoint
    from clusterformer.export import graph, parity, writer

    started = time.perf_counter()
    note = stage or (lambda _: None)
    out = Path(out)
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if out.suffix != f".{fmt}":
        raise ValueError(f"{out}: --format {fmt} writes a .{fmt} file; name --out accordingly")
    if out.is_dir():
        raise ValueError(f"{out}: is a folder; --out must be a file path")
    if image_size is not None and not writer.MIN_SIDE <= image_size <= writer.MAX_SIDE:
        raise ValueError(f"--image-size must be in [{writer.MIN_SIDE}, {writer.MAX_SIDE}], "
                         f"got {image_size}")
    if fmt == "onnx":
        _check_onnx_available()
        if opset < 17:
            raise ValueError(f"--opset must be >= 17, got {opset}")

    note("loading checkpoint")
    weights = resolve_checkpoint(ckpt)
    try:
        model, task, meta = load_model_from_checkpoint(weights, "cpu")
    except (FileNotFoundError, ValueError):
        raise
    except Exception as exc:  # noqa: BLE001 - a corrupt file: name it in one line
        raise ValueError(f"{weights}: cannot load this checkpoint: "
                         f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}") from exc
    # The file holds the weights and the graph: check for room now, not after tracing.
    files.check_writable(out.parent, weights.stat().st_size * 5 // 4 + 4 * files.MIB,
                         "the exported file", "--out")  # fmt: skip
    spec = task.spec.export
    if with_postprocess and spec.postprocess is None:
        raise ValueError(f"--with-postprocess is not available for {task.name}: its "
                         "post-processing cannot live in a graph; export without it")
    names = spec.names(with_postprocess)
    size = image_size or int(meta.get("image_size") or 224)
    size = max(size, writer.MIN_SIDE)
    example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    wrapper = graph.build_wrapper(model, spec, with_postprocess)
    eager = graph.ExportWrapper(model, spec, with_postprocess).eval()

    note("tracing with torch.export")
    program = None
    try:
        program = writer.export_program(wrapper, example, image_size)
    except Exception as exc:
        if fmt == "pt2":
            raise ValueError(f"torch.export failed for this {task.name} model: "
                             f"{' '.join(str(exc).split())[:400]}") from exc

    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.stem}.", suffix=f".tmp{out.suffix}", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        fallback = None
        if fmt == "pt2":
            assert program is not None
            exporter = "torch.export"
            metadata = writer.export_metadata(
                meta, checkpoint=weights, output_names=names, with_postprocess=with_postprocess,
                static_size=image_size, exporter=exporter, opset=None)
            note("writing .pt2")
            writer.save_pt2(program, tmp, metadata)
            note("parity: torch.export.load vs eager")
            run = parity.pt2_runner(tmp)
        else:
            note("writing ONNX")
            kind, fallback = writer.save_onnx(program, wrapper, example, tmp, output_names=names,
                                              static_size=image_size, opset=opset)
            exporter = f"torch.onnx ({kind})"
            metadata = writer.export_metadata(
                meta, checkpoint=weights, output_names=names, with_postprocess=with_postprocess,
                static_size=image_size, exporter=exporter, opset=opset)
            writer.write_onnx_metadata(tmp, metadata)
            note("parity: onnxruntime vs eager")
            run = parity.onnx_runner(tmp, names)
        sizes = [(size, size)] if image_size is not None else [(size, size), parity.second_size(size)]
        inputs = parity.parity_inputs(sizes, metadata["normalisation"]["mean"],
                                      metadata["normalisation"]["std"])
        results = parity.check_parity(run, eager, names, inputs, tolerance)
    except BaseException as exc:
        # Exporters report a full disk in odd ways ("unexpected pos", TypeErrors): ask the disk.
        full = isinstance(exc, Exception) and files.disk_full(out.parent)
        tmp.unlink(missing_ok=True)
        if full:
            raise files.no_space(out) from exc
        raise
    bad = [r for r in results if not r.ok]
    if bad:
        failed = out.with_name(f"{out.stem}.parity-failed{out.suffix}")
        _publish(tmp, failed)
        out.unlink(missing_ok=True)
        worst = max(bad, key=lambda r: r.max_rel)
        raise ParityError(
            f"{out}: parity check failed: output '{worst.output}' on the {worst.input} input at "
            f"{worst.size[0]}x{worst.size[1]} differs from eager by rel {worst.max_rel:.2e} "
            f"(abs {worst.max_abs:.2e}) > tolerance {tolerance:g}; kept as {failed.name} "
            "for inspection", results)
    _publish(tmp, out)
    return ExportResult(out, fmt, task.name, exporter, names, image_size is None, fallback,
                        results, time.perf_counter() - started)


def _publish(tmp: Path, out: Path) -> None:
    """Give the temp file normal permissions and move it to ``out``."""
    umask = os.umask(0o022)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, out)
