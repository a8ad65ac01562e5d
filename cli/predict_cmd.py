"""``cf predict``: run a checkpoint on image files, folders, globs and videos, batched through
a DataLoader; overlay PNGs and JSON (or JSON Lines) out."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from clusterformer.cli.errors import DataError, UserError
from clusterformer.cli.options import (
    Amp,
    BatchSize,
    Checkpoint,
    Compile,
    Device,
    ImageSize,
    MaxDetections,
    OnError,
    ScoreThreshold,
    Slide,
    Tta,
    flag_errors,
)
from clusterformer.cli.prediction_notes import empty_prediction_warning

# Above this many images (or with any video) the records go to OUT/predictions.jsonl, one line
# each as they are made, instead of a JSON file per image plus predictions.json held in memory.
LARGE_SET = 1000


def register(app: typer.Typer) -> None:
    app.command("predict")(predict_command)


def predict_command(
    images: Annotated[list[Path], typer.Argument(help="Image files, folders (searched recursively for images), quoted glob patterns or video files (mp4, mov, avi, mkv, webm, ...; frames read with the video extra: PyAV or imageio[ffmpeg]).")],
    ckpt: Checkpoint,
    out: Annotated[Path, typer.Option("--out", help="Folder for <name>.png overlays (<name>/<frame>.png for videos), <name>.json and predictions.json (or predictions.jsonl); <name> is the input's stem, or the stem with -2, -3, ... appended when that name is taken (compared case-insensitively) by an earlier input's outputs, predictions.json(l), the --jsonl file or an input in this folder: no input is ever written over, and each input gets its own outputs.")],
    score_threshold: ScoreThreshold = 0.3,
    max_detections: MaxDetections = 100,
    image_size: ImageSize = None,
    batch_size: BatchSize = 8,
    workers: Annotated[int, typer.Option("--workers", help="DataLoader processes decoding images (when there is more than one batch of them), and threads writing overlays (0 = all in this process, in order; videos are always read in order by this process).")] = 2,
    jsonl: Annotated[Path | None, typer.Option("--jsonl", help="Write one JSON record per image / video frame to this JSON Lines file instead of <image>.json files and predictions.json (default for videos and for more than 1000 images: OUT/predictions.jsonl); refused when it is one of the inputs.")] = None,
    slide: Slide = None,
    tta: Tta = None,
    device: Device = None,
    amp: Amp = "none",
    compile_model: Compile = False,
    on_error: Annotated[OnError, typer.Option("--on-error", help="An input that cannot be read (not an image, truncated, over --max-image-pixels): stop (the default: one line names it, exit 1, nothing written) or skip (each such input named on stderr and left out, the rest predicted and written, a count at the end; exit 0 unless no input could be read).")] = OnError.stop,
    task: Annotated[str | None, typer.Option("--task", hidden=True)] = None,
) -> None:
    """Predict on images and videos with a trained model: draws what the task predicts
    (boxes, coloured masks or the top class, with names and scores) on each image
    (OUT/<name>.png; OUT/<name>/<frame>.png per video frame) and writes one JSON
    record per image (OUT/<name>.json, masks as COCO RLE, plus OUT/predictions.json with
    every image's), or per image and frame into a JSON Lines file (--jsonl, videos,
    large sets). <name> is the input's stem, made unique in input order with -2, -3, ...
    (see --out): OUT may be the input folder. The same predictions in Python:
    clusterformer.load(CKPT)(image) (README: Python API).

    A semantic model that puts 95 % or more of the pixels of 2 or more images in one class,
    or a classifier that gives 95 % or more of 10 or more images one class, is warned about
    in one line (a model collapsed to one class)."""
    from clusterformer.inference import check_settings

    if task is not None:  # detectron2 / ultralytics users reach for it
        raise UserError(f"--task {task}: cf predict takes the task from the checkpoint (--ckpt); "
                        "leave --task out")  # fmt: skip
    with flag_errors():
        check_settings(amp=amp, score_threshold=score_threshold, max_detections=max_detections,
                       batch_size=batch_size)  # fmt: skip
    if workers < 0:
        raise UserError(f"--workers must be >= 0, got {workers}")
    images = expand_images(images)
    from clusterformer.cli.runtime_opts import start_compute

    start_compute(device)
    everything = predict_images(ckpt, images, out, workers=workers, jsonl=jsonl,
                                score_threshold=score_threshold, max_detections=max_detections,
                                image_size=image_size, device=device, amp=amp,
                                compile=compile_model, batch_size=batch_size, slide=slide,
                                tta=tta, on_error=on_error.value)  # fmt: skip
    stream = records_file(images, out, jsonl)
    if stream is None:
        typer.echo(f"wrote {len(everything)} overlay(s) and predictions.json to {out}")
    else:
        typer.echo(f"wrote {len(everything)} overlay(s) to {out} and {len(everything)} "
                   f"record(s) to {stream}")  # fmt: skip


def expand_images(paths: list[Path]) -> list[Path]:
    """Image and video files, the image files under folders (recursively, sorted) and glob
    matches."""
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


def records_file(images: list[Path], out: Path, jsonl: Path | None) -> Path | None:
    """Where the records stream as JSON Lines: ``jsonl``, else OUT/predictions.jsonl for videos
    and large sets, else None (a JSON file per image and predictions.json)."""
    from clusterformer.data.video import is_video

    if jsonl is not None:
        return jsonl
    if len(images) > LARGE_SET or any(is_video(p) for p in images):
        return out / "predictions.jsonl"
    return None


def _loaders(images: list[Path], transform: Any, batch_size: int, workers: int) -> Iterator[Any]:
    """One DataLoader per run of consecutive image files (decoded by ``workers`` processes)
    and one per video (frames in order), in input order."""
    from torch.utils.data import DataLoader

    from clusterformer.data.predict_inputs import ImageFiles, VideoFrames, collate_inputs
    from clusterformer.data.video import is_video

    start = 0
    while start < len(images):
        if is_video(images[start]):
            yield DataLoader(VideoFrames(images[start], transform, start), batch_size=batch_size,
                             collate_fn=collate_inputs)  # fmt: skip
            start += 1
            continue
        end = start
        while end < len(images) and not is_video(images[end]):
            end += 1
        files = ImageFiles(images[start:end], transform, start)
        # One batch or less: starting processes costs more than decoding it here.
        decoders = min(workers, len(files)) if len(files) > batch_size else 0
        yield DataLoader(files, batch_size=batch_size, num_workers=decoders,
                         collate_fn=collate_inputs)  # fmt: skip
        start = end


@contextlib.contextmanager
def _removed_on_failure(written: list[Path]) -> Iterator[None]:
    """A failed run (a bad image, diverged weights, full disk) leaves no partial set of
    outputs behind (files, then the folders made for video frames)."""
    try:
        yield
    except BaseException:
        for path in reversed(written):
            if path.is_dir():
                with contextlib.suppress(OSError):
                    path.rmdir()
            else:
                path.unlink(missing_ok=True)
        raise


def predict_images(ckpt: Path, images: list[Path], out: Path, *, workers: int = 0,
                   jsonl: Path | None = None, on_error: str = "stop",
                   **settings: Any) -> list[dict[str, Any]]:  # fmt: skip
    """Run checkpoint ``ckpt`` on ``images`` (image and video files) in batches; write the
    overlays and records (see ``cf predict --help``) and return the records in input order
    (video frames in frame order). ``settings`` are :func:`clusterformer.load`'s keywords
    (device, amp, compile, score_threshold, ...): the model side is its; ``workers`` decode
    images and write overlays, ``jsonl`` is ``--jsonl``, ``on_error`` ``--on-error`` (``"stop"``
    or ``"skip"``)."""
    from clusterformer.data.output_lock import hold_output
    from clusterformer.data.video import VideoExtraMissing, is_video, video_backend
    from clusterformer.inference import load

    names = plan_output_names(images, out, jsonl)  # usage errors before the model loads
    videos = [p for p in images if is_video(p)]
    if videos and video_backend() is None:
        raise DataError(str(VideoExtraMissing(videos[0])))
    with flag_errors():
        predictor = load(ckpt, **settings)  # usage errors name the flags
    made = not out.exists()
    try:
        with hold_output(out, "cf predict"):  # one writer per output folder
            run = _PredictRun(predictor, images, out, names, jsonl, workers, on_error)
            return run.write()
    except BaseException:
        if made:  # the folder this run made, empty again once its files are removed
            with contextlib.suppress(OSError):
                out.rmdir()
        raise


class _PredictRun:
    """One ``cf predict`` run: every input through ``predictor`` (a
    :class:`clusterformer.inference.Predictor`), its record and overlay written under its name;
    unreadable inputs stop the run (nothing left behind) or, with ``on_error="skip"``, are
    named on stderr and left out; one class taking nearly every prediction is warned about."""

    def __init__(self, predictor: Any, images: list[Path], out: Path, names: list[str],
                 jsonl: Path | None, workers: int, on_error: str) -> None:  # fmt: skip
        from clusterformer.inference.collapse import ClassTally

        self.predictor, self.images, self.out, self.names = predictor, images, out, names
        self.jsonl, self.workers, self.on_error = jsonl, workers, on_error
        self.tally = ClassTally(predictor.task.name, [str(c.get("name", c.get("id")))
                                                      for c in predictor.categories])  # fmt: skip
        self.skipped = 0

    def write(self) -> list[dict[str, Any]]:
        from clusterformer.cli.predict_outputs import PredictionWriter
        from clusterformer.cli.progress import progress_bar
        from clusterformer.data.video import is_video

        written: list[Path] = []
        self.out.mkdir(parents=True, exist_ok=True)
        stream = records_file(self.images, self.out, self.jsonl)
        writer = PredictionWriter(self.out, stream, written, threads=self.workers)
        complete = False
        total = None if any(is_video(p) for p in self.images) else len(self.images)
        with _removed_on_failure(written), progress_bar("predict", total) as advance:
            try:
                for loader in _loaders(self.images, self.predictor.transform,
                                       self.predictor.batch_size, self.workers):  # fmt: skip
                    writer.drain()
                    self._predict_loader(loader, writer, advance)
                if self.skipped and not writer.everything:
                    raise DataError(f"none of the {self.skipped} input(s) could be read (each "
                                    "named above); nothing was predicted")  # fmt: skip
                complete = True
            finally:
                writer.close(complete)
        self._finish()
        return writer.everything

    def _predict_loader(self, loader: Any, writer: Any, advance: Any) -> None:
        from clusterformer.data.errors import ImageDecodeError

        before = len(writer.everything)
        try:
            for batch in loader:
                self._predict_batch(batch, writer, advance)
        except ImageDecodeError as exc:  # a video that does not decode (images: per sample)
            if self.on_error == "stop":
                raise
            kept = len(writer.everything) - before
            note = f" (its {kept} frame(s) read before the error are kept)" if kept else ""
            print(f"cf predict: skipped {exc}{note}", file=sys.stderr, flush=True)
            self.skipped += 1

    def _predict_batch(self, batch: dict[str, Any], writer: Any, advance: Any) -> None:
        for message in batch["errors"]:
            if self.on_error == "stop":
                raise DataError(message)
            print(f"cf predict: skipped {message}", file=sys.stderr, flush=True)
            self.skipped += 1
            advance()
        if "images" not in batch:  # every input of the batch was unreadable
            return
        predictor = self.predictor
        for i, pred in enumerate(predictor.predict_batch({**batch, "errors": []})):
            record = pred.to_dict()
            warning = empty_prediction_warning(record["image"], record, pred.raw,
                                               predictor.score_threshold)  # fmt: skip
            if warning is not None:
                print(warning, file=sys.stderr, flush=True)
            self.tally.add(pred)
            writer.add(record, batch["raw"][i], self.names[batch["index"][i]], pred.frame)
            advance()

    def _finish(self) -> None:
        """The run's closing lines on stderr: the collapse warning, the count of skipped inputs."""
        warning = self.tally.warning()
        if warning is not None:
            print(warning, file=sys.stderr, flush=True)
        if self.skipped:
            print(f"cf predict: skipped {self.skipped} of {len(self.images)} input(s) that could "
                  "not be read (each named above); the others were predicted", file=sys.stderr,
                  flush=True)  # fmt: skip


def plan_output_names(images: list[Path], out: Path, jsonl: Path | None) -> list[str]:
    """The name each input's outputs take in ``out`` (``predict_outputs.output_names``), after
    refusing an ``out`` that is a file and a records file that is one of the inputs."""
    from clusterformer.cli.predict_outputs import COMBINED, entry_in, fold, output_names

    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: --out is a file, not a folder; give a folder for the overlays "
                        "and records")  # fmt: skip
    folders: dict[Path, Path] = {}
    inputs = {form for path in images for form in _forms(path, folders)}
    folded = {fold(str(path)) for path in inputs}
    stream = records_file(images, out, jsonl)
    combined = stream if stream is not None else out / "predictions.json"
    if any(fold(str(form)) in folded for form in _forms(combined, folders)):
        if jsonl is not None:
            raise UserError(f"{jsonl}: --jsonl is one of the input files; the records would "
                            "replace it: give another path")  # fmt: skip
        raise UserError(f"{combined}: an input file has the name cf predict gives its records; "
                        "rename it or give another --out")  # fmt: skip
    base = _real(out)
    reserved = [*COMBINED]
    if jsonl is not None:
        reserved += [e for form in _forms(jsonl, folders) if (e := entry_in(base, form))]
    if base.is_dir():
        with os.scandir(base) as entries:
            links = [(e.name, fold(str(_real(Path(e.path))))) for e in entries if e.is_symlink()]
        if links:
            # A link in OUT to an input's folder would have a video's frames written into it.
            anchors = {fold(str(p)) for path in inputs for p in (path, *path.parents)}
            reserved += [name for name, target in links if target in anchors]
    return output_names(images, base, inputs, reserved)


def _forms(path: Path, folders: dict[Path, Path]) -> tuple[Path, Path]:
    """``path`` made absolute as given (a link in OUT is replaced, not written through, but it
    is still the user's file) and with every link resolved; ``folders`` caches the resolved
    folders (resolving every file took 57 us each, most of it on the same few folders)."""
    if path.parent not in folders:
        folders[path.parent] = _real(path.parent)
    given = folders[path.parent] / path.name
    return given, _real(path) if path.is_symlink() else given


def _real(path: Path) -> Path:
    # Not Path.resolve: on Python 3.11 it raises RuntimeError at a link that loops.
    return Path(os.path.realpath(path))
