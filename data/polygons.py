"""Exact mask <-> COCO polygon conversion along pixel edges.

A polygon through the pixel corners that bound a mask rasterizes back (pycocotools) to exactly
that mask, as long as the mask has no holes and no pixels that touch only diagonally; the
synthetic-shapes generator checks ``polygons_reproduce`` and rejects the rare layout that fails.
"""

from __future__ import annotations

import warnings

import numpy as np


def _boundary_edges(mask: np.ndarray) -> dict[tuple[int, int], list[tuple[int, int]]]:
    """Directed pixel-edge segments around ``mask``, as {start corner: [end corners]}."""
    m = np.pad(mask.astype(bool), 1)
    inner = m[1:-1, 1:-1]
    edges: dict[tuple[int, int], list[tuple[int, int]]] = {}

    def add(ys: np.ndarray, xs: np.ndarray, start: tuple[int, int], end: tuple[int, int]) -> None:
        for y, x in zip(ys.tolist(), xs.tolist(), strict=True):
            edges.setdefault((x + start[0], y + start[1]), []).append((x + end[0], y + end[1]))

    # Each exposed side of a pixel (x, y) becomes one unit edge, oriented clockwise on screen.
    add(*np.nonzero(inner & ~m[:-2, 1:-1]), (0, 0), (1, 0))  # top
    add(*np.nonzero(inner & ~m[1:-1, 2:]), (1, 0), (1, 1))  # right
    add(*np.nonzero(inner & ~m[2:, 1:-1]), (1, 1), (0, 1))  # bottom
    add(*np.nonzero(inner & ~m[1:-1, :-2]), (0, 1), (0, 0))  # left
    return edges


def _drop_collinear(loop: list[tuple[int, int]]) -> np.ndarray:
    pts = np.asarray(loop, dtype=np.int64)
    prev, nxt = np.roll(pts, 1, axis=0), np.roll(pts, -1, axis=0)
    cross = (pts[:, 0] - prev[:, 0]) * (nxt[:, 1] - pts[:, 1]) - (pts[:, 1] - prev[:, 1]) * (
        nxt[:, 0] - pts[:, 0]
    )
    return pts[cross != 0]


def mask_to_polygons(mask: np.ndarray) -> list[list[float]]:
    """bool (H, W) -> COCO polygons [[x0, y0, x1, y1, ...], ...] with corners on pixel edges.

    Only outer boundaries (clockwise loops) are returned; holes cannot be expressed in COCO
    polygons (they are unioned) and are left out.
    """
    edges = _boundary_edges(mask)
    polygons = []
    while edges:
        start = min(edges)
        loop, point = [start], start
        while True:
            ends = edges[point]
            end = ends.pop()
            if not ends:
                del edges[point]
            if end == start:
                break
            loop.append(end)
            point = end
        pts = _drop_collinear(loop)
        if len(pts) < 3:
            continue
        # Shoelace sign: outer loops run clockwise on screen (positive area with y down).
        x, y = pts[:, 0].astype(np.float64), pts[:, 1].astype(np.float64)
        area = 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))
        if area > 0:
            polygons.append([float(v) for v in pts.ravel()])
    return polygons


def polygons_to_mask(polygons: list[list[float]], height: int, width: int) -> np.ndarray:
    """COCO polygons -> bool (H, W) with pycocotools' rasterization."""
    from pycocotools import mask as mask_utils

    if not polygons:
        return np.zeros((height, width), dtype=bool)
    rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # pycocotools vs numpy 2
        return mask_utils.decode(rle).astype(bool)


def polygons_reproduce(mask: np.ndarray, polygons: list[list[float]]) -> bool:
    """True when the polygons rasterize back to exactly ``mask`` (bool (H, W))."""
    return bool(np.array_equal(polygons_to_mask(polygons, *mask.shape), mask))


def mask_to_rle(mask: np.ndarray) -> dict:
    """bool (H, W) -> uncompressed COCO RLE {"counts": [...], "size": [H, W]} (column-major)."""
    flat = np.asfortranarray(mask.astype(bool)).ravel(order="F")
    changes = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0, *counts]  # RLE always starts with a run of zeros
    return {"counts": [int(c) for c in counts], "size": [int(mask.shape[0]), int(mask.shape[1])]}


def mask_to_bbox(mask: np.ndarray) -> list[float]:
    """Tight [x, y, w, h] around a bool (H, W) mask in pixel-edge coordinates; zeros if empty."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return [0.0, 0.0, 0.0, 0.0]
    x0, y0 = int(xs.min()), int(ys.min())
    return [float(x0), float(y0), float(xs.max() + 1 - x0), float(ys.max() + 1 - y0)]
