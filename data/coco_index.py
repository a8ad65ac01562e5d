"""The parts of indexing a COCO-style JSON (instances or panoptic) that both readers share:
categories, annotations grouped by image, and one lazy :class:`Entry` per listed image."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from clusterformer.data.categories import contiguous_categories
from clusterformer.data.errors import DatasetError
from clusterformer.data.records import Record
from clusterformer.data.source import (
    Entry,
    as_int,
    image_problems,
    image_stem,
    non_finite_path,
    sort_key,
    unique_keys,
)


def coco_categories(ann_path: Path, raw: list) -> list[dict]:
    """The file's ``categories`` as contiguous categories; a bad entry names the file."""
    bad = non_finite_path(raw, "categories")
    if bad:
        raise DatasetError(ann_path, f"{bad}, not a number; fix the categories")
    try:
        return contiguous_categories(raw, default_isthing=True)
    except (KeyError, ValueError, TypeError) as exc:
        raise DatasetError(ann_path, f"bad categories ({exc})") from None


def annotations_by_image(
    ann_path: Path, annotations: list[dict], describe: Callable[[dict], str]
) -> dict[int, list[dict]]:
    """Group annotations by integer ``image_id``; ``describe(ann)`` names one without an id."""
    by_image: dict[int, list[dict]] = {}
    for ann in annotations:
        image_id = as_int(ann.get("image_id"))
        if image_id is None:
            raise DatasetError(ann_path, f"{describe(ann)}; fix or remove it")
        by_image.setdefault(image_id, []).append(ann)
    return by_image


def index_images(
    ann_path: Path,
    image_list: list[dict],
    by_image: dict[int, list[dict]],
    extra_problem: Callable[[dict, list[dict]], str | None] | None = None,
) -> tuple[list[dict], dict[int, str]]:
    """The images in a stable order and the problems found per image (by position).

    ``extra_problem(image, its_annotations)`` adds a format's own check. Annotations of an
    image that is not listed stop the whole file (no sample could be built for them).
    """
    image_list = sorted(image_list, key=sort_key)
    problems = image_problems(image_list)
    if extra_problem is not None:
        for i, im in enumerate(image_list):
            problem = extra_problem(im, by_image.get(as_int(im.get("id")), []))
            if problem and i not in problems:
                problems[i] = problem
    orphans = set(by_image) - {as_int(im.get("id")) for im in image_list}
    if orphans:
        why = f" ({next(iter(problems.values()))})" if problems else ""
        raise DatasetError(ann_path, f"annotations refer to unknown image ids "
                           f"{sorted(orphans)[:5]}{why}; fix the images list")  # fmt: skip
    return image_list, problems


def image_entries(
    images_dir: Path,
    image_list: list[dict],
    problems: dict[int, str],
    by_image: dict[int, list[dict]],
    load: Callable[[dict, list[dict], str, str | None], Record],
) -> list[Entry]:
    """One lazy entry per image: ``load(image, its_annotations, key, problem)`` reads it."""
    keys = unique_keys([image_stem(im, i) for i, im in enumerate(image_list)])
    return [
        Entry(
            key,
            str(images_dir / str(im.get("file_name", ""))),
            lambda im=im, key=key, i=i: load(
                im, by_image.get(as_int(im.get("id")), []), key, problems.get(i)
            ),
        )
        for i, (key, im) in enumerate(zip(keys, image_list, strict=True))
    ]
