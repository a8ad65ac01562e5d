"""What ``cf predict`` reads: image files (a map-style dataset, decoded in DataLoader workers)
and video files (an iterable dataset of frames, read in order), both through one eval
transform, collated into padded batches that keep the decoded images for drawing.

A sample: ``image`` (3, h, w) normalised, ``size`` (h, w) after the transform, ``orig_size``
(H, W), ``raw`` the decoded uint8 (3, H, W), ``source`` (the file), ``frame`` (video frame
number or None), ``index`` (the file's position among the run's inputs). A file that does not decode gives a sample
with only ``error`` (one line naming the file), so a worker never dies on it and the caller
decides what to do.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, IterableDataset

from clusterformer.data.collate import pad_images
from clusterformer.data.errors import ImageDecodeError
from clusterformer.data.images import decode_image
from clusterformer.data.video import video_frames

Transform = Callable[[dict[str, Any]], dict[str, Any]]


def prepare_input(raw: torch.Tensor, transform: Transform, source: str | None, frame: int | None,
                  index: int) -> dict[str, Any]:  # fmt: skip
    """One decoded uint8 ``(3, H, W)`` image through ``transform``: a sample as described in
    the module docstring (``source`` None: an image given in memory, not read from a file)."""
    height, width = int(raw.shape[1]), int(raw.shape[2])
    name = "<image>" if source is None else source
    key = name if frame is None else f"{name}#{frame}"
    out = transform({"key": key, "image": raw, "image_id": 0, "orig_size": (height, width)})
    return {"image": out["image"], "size": tuple(int(v) for v in out["size"]),
            "orig_size": (height, width), "raw": raw, "source": source, "frame": frame,
            "index": index}  # fmt: skip


class ImageFiles(Dataset):
    """Image files in a given order; item ``i`` is file ``i`` decoded and transformed."""

    def __init__(self, paths: Sequence[Path], transform: Transform, first_index: int = 0) -> None:
        self.paths, self.transform, self.first_index = list(paths), transform, first_index

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, Any]:
        path = self.paths[i]
        try:
            raw = decode_image(path.read_bytes(), str(path))
        except ImageDecodeError as exc:
            return {"error": str(exc), "index": self.first_index + i}
        except OSError as exc:
            return {"error": f"{path}: cannot read ({exc.strerror or exc})", "index": self.first_index + i}
        return prepare_input(raw, self.transform, str(path), None, self.first_index + i)


class VideoFrames(IterableDataset):
    """The frames of one video file, in order (read by one process: frames come sequentially)."""

    def __init__(self, path: Path, transform: Transform, first_index: int = 0) -> None:
        self.path, self.transform, self.first_index = path, transform, first_index

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for number, frame in enumerate(video_frames(self.path)):
            raw = torch.from_numpy(frame).permute(2, 0, 1).contiguous()
            yield prepare_input(raw, self.transform, str(self.path), number, self.first_index)


def collate_inputs(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Samples -> a batch: ``images`` (B, 3, H, W) zero-padded, ``pixel_mask`` (B, H, W),
    ``targets`` (per image ``size``, ``orig_size``) and the per-image ``raw``, ``source``,
    ``frame``, ``index`` lists; ``errors``: the messages of samples that failed to decode
    (those are left out of the batch)."""
    good = [s for s in samples if "error" not in s]
    batch: dict[str, Any] = {"errors": [s["error"] for s in samples if "error" in s]}
    if not good:
        return batch
    images, mask = pad_images([s["image"] for s in good])
    batch.update(images=images, pixel_mask=mask,
                 targets=[{"size": s["size"], "orig_size": s["orig_size"]} for s in good],
                 **{k: [s[k] for s in good] for k in ("raw", "source", "frame", "index")})  # fmt: skip
    return batch
