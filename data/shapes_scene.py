"""Procedural scenes for the synthetic shapes dataset: stuff regions and occluding things.

Pure numpy, deterministic for a given ``numpy.random.Generator``. Masks are evaluated at pixel
centres with hard edges, so the painted pixels and the masks agree exactly; occlusion is
resolved in the masks (later things cover earlier ones; a mask is the visible part).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from clusterformer.data.polygons import mask_to_polygons, polygons_reproduce

THING_CLASSES = ("circle", "rectangle", "triangle", "ellipse")
STUFF_CLASSES = ("sky", "ground", "water")

# Colours are independent of the class, so a model must learn shape, not colour.
PALETTE = np.array(
    [
        [220, 40, 40], [40, 170, 60], [50, 80, 220], [235, 210, 40], [200, 60, 200],
        [40, 200, 210], [245, 140, 30], [245, 245, 245], [30, 30, 30], [140, 90, 200],
    ],
    dtype=np.float64,
)  # fmt: skip

STUFF_COLOURS = {"sky": (135, 190, 235), "ground": (120, 95, 60), "water": (40, 90, 150)}


@dataclass
class Thing:
    """One thing (or crowd region): its full (unoccluded) mask and how to paint it."""

    name: str
    mask: np.ndarray  # bool (H, W)
    colour: np.ndarray  # float (3,)
    crowd: bool = False


@dataclass
class Scene:
    """A composed scene: image, stuff map and the visible masks of the kept things."""

    image: np.ndarray  # uint8 (H, W, 3)
    stuff: np.ndarray  # int (H, W): index into STUFF_CLASSES
    things: list[Thing]
    visible: list[np.ndarray]  # bool (H, W) per thing, in painting order
    polygons: list[list[list[float]] | None]  # COCO polygons per thing (None for crowd)


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    return xx + 0.5, yy + 0.5


def _rotated(xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, angle: float):
    c, s = np.cos(angle), np.sin(angle)
    dx, dy = xx - cx, yy - cy
    return c * dx + s * dy, -s * dx + c * dy


def shape_mask(
    rng: np.random.Generator,
    name: str,
    size: int,
    scale: tuple[float, float],
    centre: tuple[float, float] = (0.15, 0.85),
) -> np.ndarray:
    """A random ``name`` shape: bool (size, size) mask; radius and centre relative to size."""
    xx, yy = _grid(size)
    r = rng.uniform(*scale) * size
    cx, cy = rng.uniform(*centre, size=2) * size
    angle = rng.uniform(0, np.pi)
    if name == "circle":
        return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    u, v = _rotated(xx, yy, cx, cy, angle)
    if name == "ellipse":
        ratio = rng.uniform(1.8, 2.6)  # clearly not a circle
        return (u / r) ** 2 + (v * ratio / r) ** 2 <= 1.0
    if name == "rectangle":
        a, b = r * rng.uniform(0.7, 1.0), r * rng.uniform(0.45, 0.9)
        return (np.abs(u) <= a) & (np.abs(v) <= b)
    if name == "triangle":
        angles = angle + np.array([0.0, 2.0, 4.0]) * np.pi / 3 + rng.uniform(-0.25, 0.25, 3)
        px, py = cx + r * np.cos(angles), cy + r * np.sin(angles)
        inside = np.ones_like(xx, dtype=bool)
        for i in range(3):
            j = (i + 1) % 3
            # Counter-clockwise vertices (angles increase): inside is left of every edge.
            cross = (px[j] - px[i]) * (yy - py[i]) - (py[j] - py[i]) * (xx - px[i])
            inside &= cross >= 0
        return inside
    raise ValueError(f"unknown shape {name!r}")


def stuff_map(rng: np.random.Generator, size: int) -> np.ndarray:
    """int (size, size) stuff indices: sky above a wavy horizon, ground and maybe water below."""
    xx, yy = _grid(size)
    horizon = size * rng.uniform(0.3, 0.6) + size * 0.05 * np.sin(
        xx / size * rng.uniform(2, 7) + rng.uniform(0, 6.3)
    )
    out = np.where(yy < horizon, 0, 1)
    if rng.random() < 0.6:
        edge = size * rng.uniform(0.3, 0.7) + size * 0.06 * np.sin(yy / size * rng.uniform(3, 9))
        water = (xx < edge) if rng.random() < 0.5 else (xx > edge)
        out = np.where((yy >= horizon) & water, 2, out)
    return out.astype(np.int64)


def paint_stuff(rng: np.random.Generator, stuff: np.ndarray) -> np.ndarray:
    """float (H, W, 3) textured stuff colours (gradient sky, noisy ground, striped water)."""
    size = stuff.shape[0]
    image = np.zeros((*stuff.shape, 3), dtype=np.float32)
    noise = rng.standard_normal(size=(*stuff.shape, 3), dtype=np.float32)
    for index, name in enumerate(STUFF_CLASSES):
        base = np.array(STUFF_COLOURS[name], dtype=np.float32) + rng.uniform(-20, 20, 3).astype(np.float32)
        region = stuff == index
        if not region.any():
            continue
        ys, xs = np.nonzero(region)
        yc, xc = ys.astype(np.float32) + 0.5, xs.astype(np.float32) + 0.5
        if name == "sky":
            texture = (1.0 - yc / size)[:, None] * 40.0 + noise[region] * 3.0
        elif name == "ground":
            blobs = rng.standard_normal(size=stuff.shape, dtype=np.float32)
            smooth = ndimage.uniform_filter(blobs, size=5)[region]
            texture = smooth[:, None] * 60.0 + noise[region] * 12.0
        else:
            waves = np.sin(yc * rng.uniform(0.6, 1.2) + 0.3 * np.sin(xc * 0.2))
            texture = waves[:, None] * 18.0 + noise[region] * 5.0
        image[region] = base + texture
    return image


def paint_thing(rng: np.random.Generator, image: np.ndarray, thing: Thing) -> np.ndarray:
    """Paint a flat-shaded thing with slight noise over ``image``; returns a new array."""
    out = image.copy()
    count = int(thing.mask.sum())
    out[thing.mask] = thing.colour + rng.normal(0.0, 6.0, size=(count, 3))
    return out


def crowd_mask(rng: np.random.Generator, size: int) -> np.ndarray:
    """A cluster of small circles annotated as one crowd region (COCO's iscrowd=1)."""
    xx, yy = _grid(size)
    cx, cy = rng.uniform(0.25, 0.75, size=2) * size
    mask = np.zeros((size, size), dtype=bool)
    for _ in range(int(rng.integers(5, 9))):
        r = rng.uniform(0.03, 0.05) * size
        ox, oy = rng.normal(0.0, 0.08 * size, size=2)
        mask |= (xx - cx - ox) ** 2 + (yy - cy - oy) ** 2 <= r * r
    return mask


def _visible(things: list[Thing]) -> list[np.ndarray]:
    covered = np.zeros_like(things[0].mask) if things else None
    out: list[np.ndarray] = []
    for thing in reversed(things):
        out.append(thing.mask & ~covered)
        covered = covered | thing.mask
    return out[::-1]


def _first_bad(things: list[Thing], visible: list[np.ndarray], min_area: int):
    """Index of the first thing whose visible part is too small or not polygon-exact."""
    polygons: list[list[list[float]] | None] = []
    for i, (thing, mask) in enumerate(zip(things, visible, strict=True)):
        if int(mask.sum()) < min_area:
            return i, polygons
        if thing.crowd:
            polygons.append(None)
            continue
        if not np.array_equal(ndimage.binary_fill_holes(mask), mask):
            return i, polygons
        poly = mask_to_polygons(mask)
        if not polygons_reproduce(mask, poly):
            return i, polygons
        polygons.append(poly)
    return None, polygons


def compose(things: list[Thing], min_area: int) -> tuple[list[Thing], list, list]:
    """Drop things until every visible part is big enough and exactly expressible as polygons.

    Returns (kept things, visible masks, polygons), all in painting order.
    """
    things = list(things)
    while True:
        visible = _visible(things)
        bad, polygons = _first_bad(things, visible, min_area)
        if bad is None:
            return things, visible, polygons
        del things[bad]


def _free_placement(
    rng: np.random.Generator, name: str, size: int, scale: tuple[float, float],
    mask: np.ndarray, taken: np.ndarray, tries: int = 20,
) -> np.ndarray | None:
    """``mask``, or a redraw of it, that keeps a pixel's gap to ``taken``; None after ``tries``."""
    for _ in range(tries):
        if not (ndimage.binary_dilation(mask) & taken).any():
            return mask
        mask = shape_mask(rng, name, size, scale)
    return None


THING_SCALE = (0.08, 0.22)  # radius range of the scenes' things, relative to the side


def random_scene(
    rng: np.random.Generator, size: int, num_things: int, with_crowd: bool,
    thing_scale: tuple[float, float] = THING_SCALE, occlusion: bool = True,
    contrast: bool = False,
) -> Scene:
    """Stuff background plus ``num_things`` random things (+ a crowd region painted first);
    each thing's radius is drawn from ``thing_scale`` times ``size``. With ``occlusion=False``
    a thing is redrawn (up to 20 times, else left out) until it keeps a pixel's gap to the
    ones before it, so every thing shows its whole outline. With ``contrast=True`` a thing's
    colour is redrawn from the half of the palette farthest from what it covers."""
    stuff = stuff_map(rng, size)
    things: list[Thing] = []
    if with_crowd:
        things.append(Thing("circle", crowd_mask(rng, size), PALETTE[rng.integers(len(PALETTE))], True))
    taken = things[0].mask.copy() if with_crowd else np.zeros((size, size), dtype=bool)
    for _ in range(num_things):
        name = THING_CLASSES[int(rng.integers(len(THING_CLASSES)))]
        mask = shape_mask(rng, name, size, thing_scale)
        if not occlusion:
            mask = _free_placement(rng, name, size, thing_scale, mask, taken)
            if mask is None:
                continue
            taken |= mask
        things.append(Thing(name, mask, PALETTE[int(rng.integers(len(PALETTE)))]))
    image = paint_stuff(rng, stuff)
    things, visible, polygons = compose(things, min_area=max(12, size * size // 400))
    for thing in things:
        if contrast and not thing.crowd:
            thing.colour = contrasting_colour(rng, image[thing.mask].mean(axis=0))
        image = paint_thing(rng, image, thing)
    return Scene(np.clip(np.rint(image), 0, 255).astype(np.uint8), stuff, things, visible, polygons)


def calm_stuff(rng: np.random.Generator, stuff: np.ndarray) -> np.ndarray:
    """float (H, W, 3): flat stuff colours (jittered per image) with faint pixel noise."""
    image = np.zeros((*stuff.shape, 3), dtype=np.float64)
    for index, name in enumerate(STUFF_CLASSES):
        image[stuff == index] = np.array(STUFF_COLOURS[name]) + rng.uniform(-20, 20, 3)
    return image + rng.normal(0.0, 3.0, size=image.shape)


def contrasting_colour(rng: np.random.Generator, background: np.ndarray) -> np.ndarray:
    """float (3,): a random colour from the half of the palette farthest (L1) from ``background``."""
    distance = np.abs(PALETTE - background).sum(axis=1)
    contrasting = np.argsort(-distance, kind="stable")[: len(PALETTE) // 2]
    return PALETTE[int(contrasting[int(rng.integers(len(contrasting)))])]


def classification_image(rng: np.random.Generator, size: int, name: str) -> np.ndarray:
    """uint8 (size, size, 3): one large, near-central ``name`` shape over a stuff background.

    The background keeps the stuff layout (horizon, water edge) but not the scenes' strong
    texture, and the colour is drawn from the half of the palette that contrasts most with the
    background under the shape: the class is readable from the outline, never from colour.
    Rotation, size (radius 0.25-0.35 of the side) and position still vary.
    """
    stuff = stuff_map(rng, size)
    image = calm_stuff(rng, stuff)
    mask = shape_mask(rng, name, size, (0.25, 0.35), centre=(0.4, 0.6))
    colour = contrasting_colour(rng, image[mask].mean(axis=0))
    image = paint_thing(rng, image, Thing(name, mask, colour))
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)
