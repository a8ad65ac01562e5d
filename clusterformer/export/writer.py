"""Trace the export graph and write it: ``torch.export`` programs (``.pt2``) and ONNX files.

Dynamic shapes: batch is always dynamic; height and width are dynamic in ``[MIN_SIDE,
MAX_SIDE]`` unless a static ``image_size`` is asked for. Tracing runs with
``backed_size_oblivious`` on, so the exporter does not specialise on map sizes that happen
to be 1 in the example (e.g. one window per side in the last stage).

Metadata (see :func:`export_metadata`) travels inside the file: ONNX ``metadata_props``
(the whole record as JSON under ``"clusterformer"`` plus flat ``task``, ``classes``,
``mean``, ``std``, ``image_size``, ``preprocess``, ``preset`` keys) and, for ``.pt2``, the ``extra_files``
entry ``"clusterformer.json"`` of ``torch.export.save``. :func:`read_export_metadata` reads
either.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from clusterformer.export.onnx_graph import rewrite_onnx_file

EXPORT_FORMAT = "clusterformer-export-v1"
METADATA_FILE = "clusterformer.json"
FORMATS = ("onnx", "pt2")
MIN_SIDE, MAX_SIDE, MAX_BATCH = 32, 4096, 1024
DEFAULT_OPSET = 18


def dynamic_shapes(static_size: int | None) -> dict[str, dict[int, Any]]:
    """``dynamic_shapes`` for the ``images`` input: batch always, H and W unless static."""
    from torch.export import Dim

    dims: dict[int, Any] = {0: Dim("batch", min=1, max=MAX_BATCH)}
    if static_size is None:
        dims[2] = Dim("height", min=MIN_SIDE, max=MAX_SIDE)
        dims[3] = Dim("width", min=MIN_SIDE, max=MAX_SIDE)
    return {"images": dims}


def export_program(
    wrapper: nn.Module, example: Tensor, static_size: int | None
) -> torch.export.ExportedProgram:
    """``torch.export`` (non-strict) of ``wrapper`` on ``example`` ``(B>=2, 3, H, W)``."""
    import torch.fx.experimental._config as fx_config

    with fx_config.patch(backed_size_oblivious=True), _quiet():
        return torch.export.export(
            wrapper, (example,), dynamic_shapes=dynamic_shapes(static_size), strict=False
        )


def save_pt2(program: torch.export.ExportedProgram, path: Path, metadata: dict[str, Any]) -> None:
    """``torch.export.save`` with the metadata as the ``clusterformer.json`` extra file."""
    torch.export.save(program, str(path), extra_files={METADATA_FILE: json.dumps(metadata)})


def save_onnx(
    program: torch.export.ExportedProgram | None,
    wrapper: nn.Module,
    example: Tensor,
    path: Path,
    *,
    output_names: tuple[str, ...],
    static_size: int | None,
    opset: int,
) -> tuple[str, str | None]:
    """Write ONNX with the dynamo exporter from ``program``; fall back to the TorchScript
    exporter on ``wrapper`` when there is no program or the dynamo exporter fails. The dynamo
    exporter's graph gets :mod:`.onnx_graph`'s rewrites (the TorchScript exporter traces eager
    code, which has nothing for them to do).

    Returns:
        (exporter used: ``"dynamo"`` or ``"torchscript"``, why the fallback was needed or None).
    """
    reason = "torch.export failed" if program is None else None
    if program is not None:
        try:
            with _quiet():
                torch.onnx.export(
                    program, (example,), str(path), dynamo=True, opset_version=opset,
                    input_names=["images"], output_names=list(output_names),
                    external_data=False, verbose=False,
                )
            rewrite_onnx_file(path)
            return "dynamo", None
        except Exception as exc:  # noqa: BLE001 - any exporter failure means: try the other one
            reason = f"dynamo exporter failed: {' '.join(str(exc).split())[:300]}"
    axes = {0: "batch"} if static_size is not None else {0: "batch", 2: "height", 3: "width"}
    with _quiet():
        torch.onnx.export(
            wrapper, (example,), str(path), dynamo=False, opset_version=opset,
            input_names=["images"], output_names=list(output_names),
            dynamic_axes={"images": axes, **{n: {0: "batch"} for n in output_names}},
        )
    return "torchscript", reason


def module_to_onnx(module: nn.Module, example: Tensor, path: Path, *,
                   output_names: tuple[str, ...], static_size: int | None,
                   opset: int = DEFAULT_OPSET) -> tuple[str, str | None]:  # fmt: skip
    """Write ``module`` (``images -> outputs``, left untouched) to ONNX as ``cf export`` writes
    a checkpoint's graph: an export-friendly copy (``graph.exportable_copy``) traced by
    ``torch.export`` and written by the dynamo exporter, the TorchScript exporter as fallback.
    No metadata and no parity check (:func:`clusterformer.export.export_checkpoint` adds both).

    Returns:
        as :func:`save_onnx`.
    """
    from clusterformer.export.graph import exportable_copy

    wrapper = exportable_copy(module)
    try:
        program = export_program(wrapper, example, static_size)
    except Exception:  # noqa: BLE001 - save_onnx falls back to the TorchScript exporter
        program = None
    return save_onnx(program, wrapper, example, path, output_names=output_names,
                     static_size=static_size, opset=opset)


def write_onnx_metadata(path: Path, metadata: dict[str, Any]) -> None:
    """Store ``metadata`` in the ONNX file's ``metadata_props`` (rewrites the file)."""
    import onnx

    model = onnx.load(str(path))
    props = {
        "clusterformer": json.dumps(metadata),
        "task": metadata["task"],
        "classes": json.dumps([c.get("name", str(c.get("id"))) for c in metadata["categories"]]),
        "mean": json.dumps(metadata["normalisation"]["mean"]),
        "std": json.dumps(metadata["normalisation"]["std"]),
        "image_size": json.dumps(metadata["image_size"]),
        "preprocess": json.dumps(metadata["preprocess"]),
        "preset": str(metadata["preset"]),
    }
    existing = {p.key: p for p in model.metadata_props}
    for key, value in props.items():
        entry = existing.get(key) or model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))


MAX_METADATA_BYTES = 16 * 2**20


def _pt2_metadata(p: Path) -> str | None:
    """The ``extra/clusterformer.json`` member of a ``.pt2`` (zip) archive, read as text.

    Read with ``zipfile`` only: ``torch.export.load`` would unpickle members of the archive,
    which runs any code a crafted file holds.
    """
    try:
        with zipfile.ZipFile(p) as archive:
            members = [i for i in archive.infolist()
                       if i.filename.split("/")[-2:] == ["extra", METADATA_FILE]]  # fmt: skip
            if not members:
                return None
            if members[0].file_size > MAX_METADATA_BYTES:
                raise ValueError(f"{p}: metadata member is {members[0].file_size} bytes; not a "
                                 "file written by cf export")  # fmt: skip
            return archive.read(members[0]).decode("utf-8")
    except (zipfile.BadZipFile, UnicodeDecodeError, OSError) as exc:
        raise ValueError(f"{p}: not a .pt2 archive ({' '.join(str(exc).split())[:80]}); export "
                         "it again with cf export --format pt2") from None


def read_export_metadata(path: str | Path) -> dict[str, Any]:
    """The ``clusterformer`` metadata record of an exported ``.onnx`` or ``.pt2`` file.

    Nothing in the file is executed: ONNX is protobuf, and a ``.pt2`` archive is opened as a
    zip and only its metadata member is read (never unpickled).
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: exported model not found")
    if p.suffix == ".onnx":
        import onnx

        try:
            model = onnx.load(str(p), load_external_data=False)
        except Exception as exc:  # noqa: BLE001 - protobuf raises several types for bad bytes
            raise ValueError(f"{p}: not an ONNX file ({type(exc).__name__}); export it again "
                             "with cf export --format onnx") from None  # fmt: skip
        raw = {e.key: e.value for e in model.metadata_props}.get("clusterformer")
    elif p.suffix == ".pt2":
        raw = _pt2_metadata(p)
    else:
        raise ValueError(f"{p}: expected an .onnx or .pt2 file written by cf export")
    if raw is None:
        raise ValueError(f"{p}: no clusterformer metadata in this file; export it with cf export")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{p}: clusterformer metadata is not valid JSON ({exc.msg})") from None
    except RecursionError:
        raise ValueError(f"{p}: clusterformer metadata is JSON nested too deeply") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{p}: clusterformer metadata is not a JSON object")
    return meta


def export_metadata(
    meta: dict[str, Any],
    *,
    checkpoint: Path,
    output_names: tuple[str, ...],
    with_postprocess: bool,
    static_size: int | None,
    exporter: str,
    opset: int | None,
) -> dict[str, Any]:
    """Everything a consumer needs besides the graph: task, classes, preset, normalisation,
    input convention, output names and how they were produced."""
    from clusterformer import __version__
    from clusterformer.engine.evaluate import eval_preprocess

    model_config = dict(meta["model_config"])
    normalisation = meta["normalisation"]  # the checkpoint's (load_model_from_checkpoint)
    side = static_size if static_size is not None else "dynamic"
    # The checkpoint's own record (README: how to apply it with PIL and numpy); a static
    # square input fixes the size its crop / square resize produces.
    record = eval_preprocess(meta)
    if static_size is not None and (record.crop is not None or record.resize == "square"):
        record = record.at_size(static_size)
    return {
        "format": EXPORT_FORMAT,
        "task": meta["task"],
        "categories": list(meta.get("categories") or []),
        "num_classes": model_config.get("num_classes"),
        "preset": model_config.get("name"),
        "model_config": model_config,
        "task_config": meta.get("task_config") or {},
        "normalisation": {"mean": list(normalisation["mean"]), "std": list(normalisation["std"])},
        "image_size": meta.get("image_size"),
        "preprocess": record.to_dict(),
        "input": {
            "name": "images", "dtype": "float32", "layout": "NCHW RGB",
            "preprocess": f"{record.describe()} (bilinear, antialiased), pixels / 255, then "
                          "(x - mean) / std per channel; the 'preprocess' record",
            "batch": "dynamic", "height": side, "width": side,
            "min_side": MIN_SIDE if static_size is None else static_size,
            "max_side": MAX_SIDE if static_size is None else static_size,
        },
        "outputs": list(output_names),
        "with_postprocess": with_postprocess,
        "exporter": exporter,
        "opset": opset,
        "source_checkpoint": str(checkpoint),
        "step": meta.get("step"),
        "torch_version": torch.__version__,
        "clusterformer_version": __version__,
    }


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporters' progress prints, warnings and logs (failures still raise)."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._export",
                                                "torch.fx.experimental.symbolic_shapes",
                                                "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
