"""Video frames for ``cf predict``: RGB uint8 frames read through PyAV or imageio (ffmpeg),
whichever is installed (the ``video`` extra); neither gives one line saying what to install.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from clusterformer.data.errors import ImageDecodeError
from clusterformer.data.images import check_pixels

VIDEO_EXTENSIONS = ("mp4", "avi", "mov", "mkv", "webm", "m4v", "mpg", "mpeg", "wmv")
VIDEO_EXTRA = "install the video extra: pip install 'clusterformer[video]'"


class VideoExtraMissing(ImportError):
    """Neither PyAV nor imageio can be imported."""

    def __init__(self, path: object) -> None:
        super().__init__(f"{path}: reading video needs PyAV or imageio[ffmpeg]; {VIDEO_EXTRA}")


def is_video(path: Path) -> bool:
    return path.suffix.lower().lstrip(".") in VIDEO_EXTENSIONS


def video_backend() -> str | None:
    """``"av"``, ``"imageio"`` or None: what :func:`video_frames` would read with."""
    import importlib.util

    for name in ("av", "imageio"):
        if importlib.util.find_spec(name) is not None:
            return name
    return None


def video_frames(path: Path) -> Iterator[np.ndarray]:
    """The frames of a video file in order, each ``(H, W, 3)`` uint8 RGB.

    Raises:
        VideoExtraMissing: no reader installed.
        ImageDecodeError: the file is not a readable video (names the file).
    """
    backend = video_backend()
    if backend is None:
        raise VideoExtraMissing(path)
    reader = _av_frames if backend == "av" else _imageio_frames
    try:
        yield from reader(path)
    except (ImageDecodeError, FileNotFoundError):
        raise
    except Exception as exc:  # noqa: BLE001 - the readers raise many kinds for bad files
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise ImageDecodeError(str(path), f"cannot decode video ({reason})") from None


def _av_frames(path: Path) -> Iterator[np.ndarray]:
    import av

    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ImageDecodeError(str(path), "no video stream in this file")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # ffmpeg decodes on its own threads
        check_pixels(stream.codec_context.width, stream.codec_context.height, str(path))
        for frame in container.decode(stream):
            yield frame.to_ndarray(format="rgb24")


def _imageio_frames(path: Path) -> Iterator[np.ndarray]:
    import imageio.v3 as iio

    for frame in iio.imiter(path):
        frame = np.asarray(frame)
        check_pixels(frame.shape[1], frame.shape[0], str(path))  # decoded already: bound the rest
        if frame.ndim == 2:
            frame = np.repeat(frame[:, :, None], 3, axis=2)
        yield np.ascontiguousarray(frame[:, :, :3].astype(np.uint8, copy=False))
