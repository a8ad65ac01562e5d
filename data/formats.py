"""One entry point for the four raw formats: ``open_source(format, images=..., ...)``."""

from __future__ import annotations

from pathlib import Path

from clusterformer.data.records import FORMATS
from clusterformer.data.source import Source

# Which of --annotations / --masks each format needs (True) or accepts (None) or rejects (False).
_ARGS = {
    "coco": {"annotations": True, "masks": False},
    "coco-panoptic": {"annotations": True, "masks": True},
    "ade20k": {"annotations": None, "masks": True},
    "imagefolder": {"annotations": False, "masks": False},
}


def check_arguments(format: str, annotations: object, masks: object) -> None:
    """ValueError when ``format`` is unknown or --annotations / --masks do not fit it."""
    if format not in _ARGS:
        raise ValueError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    given = {"annotations": annotations, "masks": masks}
    for name, need in _ARGS[format].items():
        if need and given[name] is None:
            raise ValueError(f"--format {format} needs --{name}")
        if need is False and given[name] is not None:
            raise ValueError(f"--{name} is not used with --format {format}")


def open_source(
    format: str,
    images: str | Path,
    annotations: str | Path | None = None,
    masks: str | Path | None = None,
) -> Source:
    """Open a raw dataset in one of ``FORMATS``; raises ValueError for a wrong combination.

    coco: images + annotations (instances JSON); coco-panoptic: images + annotations
    (panoptic JSON) + masks (PNG folder); ade20k: images + masks (+ annotations = classes.json);
    imagefolder: images (the folder holding one sub-folder per class).
    """
    check_arguments(format, annotations, masks)
    if format == "coco":
        from clusterformer.data.coco import read_coco

        return read_coco(images, annotations)
    if format == "coco-panoptic":
        from clusterformer.data.panoptic import read_panoptic

        return read_panoptic(images, annotations, masks)
    if format == "ade20k":
        from clusterformer.data.ade20k import read_ade20k

        return read_ade20k(images, masks, annotations)
    from clusterformer.data.imagefolder import read_imagefolder

    return read_imagefolder(images)
