"""``cf predict``: run a checkpoint on image files; overlay PNGs and JSON out."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer

from clusterformer.cli.errors import DataError, UserError


def register(app: typer.Typer) -> None:
    @app.command("predict")
    def predict_command(
        images: list[Path] = typer.Argument(..., help="Image files, folders (searched recursively) or quoted glob patterns to run the model on (jpg, png, ...)."),
        ckpt: Path = typer.Option(..., "--ckpt", help="A run folder or a .safetensors checkpoint."),
        out: Path = typer.Option(..., "--out", help="Folder for <image>.png overlays, <image>.json and predictions.json."),
        score_threshold: float = typer.Option(0.3, "--score-threshold", help="Detection / instance: keep objects scoring at least this (0-1)."),
        max_detections: int = typer.Option(100, "--max-detections", help="Detection / instance: at most this many objects per image."),
        image_size: int | None = typer.Option(None, "--image-size", help="Inference size (default: the checkpoint's training size)."),
        device: str | None = typer.Option(None, "--device", help="cpu, cuda or cuda:N (default: CUDA when available)."),
        amp: str = typer.Option("none", "--amp", help="Mixed precision for inference: bf16, fp16 (CUDA) or none."),
        compile_model: bool = typer.Option(False, "--compile/--no-compile", help="torch.compile the model (inductor with frozen weights); the first image is checked against eager."),
    ) -> None:
        """Predict on IMAGE files with a trained model: draws what the task predicts (boxes,
        coloured masks or the top class, with names and scores) on each image (OUT/<stem>.png)
        and writes OUT/<stem>.json (masks as COCO RLE) plus OUT/predictions.json with every
        image's results."""
        if not 0.0 <= score_threshold <= 1.0:
            raise UserError(f"--score-threshold must be in [0, 1], got {score_threshold}")
        if max_detections < 1:
            raise UserError(f"--max-detections must be >= 1, got {max_detections}")
        if amp not in ("bf16", "fp16", "none"):
            raise UserError(f"--amp must be one of bf16, fp16, none, got '{amp}'")
        images = expand_images(images)
        from clusterformer.cli.runtime_opts import start_compute

        start_compute(device)
        everything = predict_images(ckpt, images, out, score_threshold=score_threshold,
                                    max_detections=max_detections, image_size=image_size,
                                    device=device, amp=amp, compile_model=compile_model)
        typer.echo(f"wrote {len(everything)} overlay(s) and predictions.json to {out}")


def expand_images(paths: list[Path]) -> list[Path]:
    """Image files, the image files under folders (recursively, sorted) and glob matches."""
    import glob

    from clusterformer.data.images import IMAGE_EXTENSIONS

    out: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = sorted(
                p for p in path.rglob("*")
                if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )  # fmt: skip
            if not found:
                kinds = ", ".join(IMAGE_EXTENSIONS[:4])
                raise DataError(f"{path}: no image files ({kinds}, ...) in this folder; give "
                                "image files or a folder of images")  # fmt: skip
            out.extend(found)
        elif path.is_file():
            out.append(path)
        elif glob.has_magic(str(path)) and glob.glob(str(path)):
            out.extend(expand_images(sorted(Path(p) for p in glob.glob(str(path)))))
        else:
            raise FileNotFoundError(f"{path}: image not found; check the path")
    return out


def _check_images(images: list[Path]) -> None:
    """Decode every image once before anything is written: a bad one stops the run with
    nothing written (one line naming the file)."""
    from clusterformer.data.images import decode_image_array

    for path in images:
        decode_image_array(path.read_bytes(), str(path))


@contextlib.contextmanager
def _removed_on_failure(written: list[Path]) -> Iterator[None]:
    """A failed run (diverged weights, full disk) leaves no partial set of outputs behind."""
    try:
        yield
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise


def _check_outputs(outputs: Any, ckpt: Path, path: Path) -> None:
    from clusterformer.engine.finite import describe_output, non_finite_output

    bad = non_finite_output(outputs)
    if bad is not None:  # NaN scores are no prediction (and not JSON)
        raise DataError(f"{ckpt}: model {describe_output(bad)} is NaN or infinite on {path}: "
                        "the weights are unusable; use an earlier checkpoint")  # fmt: skip


def predict_images(
    ckpt: Path,
    images: list[Path],
    out: Path,
    *,
    score_threshold: float = 0.3,
    max_detections: int = 100,
    image_size: int | None = None,
    device: str | None = None,
    amp: str = "none",
    compile_model: bool = False,
) -> list[dict[str, Any]]:
    """Run checkpoint ``ckpt`` on ``images``; write OUT/<stem>.png overlays, OUT/<stem>.json and
    OUT/predictions.json, and return the per-image records."""
    import torch
    from rich.progress import Progress

    from clusterformer.data import decode_image
    from clusterformer.data.preprocess import eval_transform
    from clusterformer.engine.distributed import pick_device
    from clusterformer.engine.evaluate import autocast, eval_preprocess, load_model_from_checkpoint
    from clusterformer.tasks.predictions import draw_overlay

    dev = pick_device(device)
    model, task, meta = load_model_from_checkpoint(ckpt, dev)
    if compile_model:
        from clusterformer.engine.compiled import checked_inference_compile

        model = checked_inference_compile(model, amp, f"{task.name} model")
    categories = task.categories
    transform = eval_transform(eval_preprocess(meta, image_size))  # the checkpoint's record
    _check_images(images)
    out.mkdir(parents=True, exist_ok=True)
    names = _unique_stems(images)
    everything = []
    written: list[Path] = []
    with _removed_on_failure(written), Progress(transient=True) as progress, torch.no_grad():
        bar = progress.add_task("predict", total=len(images))
        for path, stem in zip(images, names, strict=True):
            image = decode_image(path.read_bytes(), str(path))
            height, width = int(image.shape[1]), int(image.shape[2])
            sample = transform({"key": stem, "image": image, "image_id": 0, "orig_size": (height, width)})
            batch = {
                "images": sample["image"].unsqueeze(0).to(dev),
                "pixel_mask": torch.ones(1, *sample["image"].shape[1:], dtype=torch.bool, device=dev),
                "targets": [{"orig_size": (height, width), "size": tuple(sample["size"])}],
            }
            with autocast(amp, dev):
                outputs = task.forward(model, batch)
            _check_outputs(outputs, ckpt, path)
            pred = task.postprocess(outputs, batch)[0]
            result = task.spec.describe(pred, categories, score_threshold, max_detections)
            record = {"image": str(path), "height": height, "width": width, "task": task.name, **result}
            written.extend([out / f"{stem}.png", out / f"{stem}.json"])
            _save_png(draw_overlay(image, record), out / f"{stem}.png")
            _write_json(out / f"{stem}.json", record)
            everything.append(record)
            progress.advance(bar)
        _write_json(out / "predictions.json", everything)
    return everything


def _unique_stems(paths: list[Path]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for path in paths:
        count = seen.get(path.stem, 0)
        seen[path.stem] = count + 1
        out.append(path.stem if count == 0 else f"{path.stem}-{count}")
    return out


def _save_png(canvas: Any, path: Path) -> None:
    import io

    from clusterformer.engine.files import atomic_write_bytes

    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


def _write_json(path: Path, obj: Any) -> None:
    from clusterformer.engine.files import atomic_write_json

    atomic_write_json(path, obj)
