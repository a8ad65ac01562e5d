"""Is a model collapsed to one class? The check ``cf predict`` and ``cf eval`` warn with, for a
Python user too: :class:`ClassTally` counts what a run predicted per class and
:func:`collapse_warning` turns counts into one warning line (or ``None``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# A model whose predictions pile into one class has most likely collapsed (a diverged or
# barely trained run, a wrong checkpoint): at least this share of the predicted pixels
# (semantic) or images (classification) in one class, over at least the number of images
# below, gives one warning line. A single photo can be all sky, and a folder of cats is all
# cat, hence the minimums; ``cf eval`` also knows the truth and stays silent when the data
# itself is that one-sided.
COLLAPSE_SHARE = 0.95
COLLAPSE_MIN_IMAGES = {"pixels": 2, "images": 10}
# The tasks whose predictions are one class per pixel / per image, and what is counted.
COLLAPSE_UNITS = {"semantic": "pixels", "classification": "images"}


def collapse_warning(predicted: Any, names: Sequence[str], images: int, unit: str,
                     truth: Any = None) -> str | None:  # fmt: skip
    """``warning: ...`` when one class holds at least :data:`COLLAPSE_SHARE` of ``predicted``
    (per-class counts of ``unit``: pixels or images) over at least ``images`` >=
    :data:`COLLAPSE_MIN_IMAGES` images, else ``None``. ``truth``: the same counts in the ground
    truth (``cf eval``): no warning when the data holds the class at that share too."""
    import numpy as np

    counts = np.asarray(predicted, dtype=np.float64).reshape(-1)
    total = counts.sum()
    if images < COLLAPSE_MIN_IMAGES[unit] or total <= 0:
        return None
    top = int(counts.argmax())
    share = counts[top] / total
    if share < COLLAPSE_SHARE:
        return None
    name = str(names[top]) if top < len(names) else str(top)
    said = f"warning: '{name}' takes {share:.1%} of the {unit} predicted over {images} images"
    if truth is None:
        return (f"{said} (>= {COLLAPSE_SHARE:.0%}): unless the images are all '{name}', the "
                "model has collapsed to one class; check its training (loss, lr) or the "
                "checkpoint")  # fmt: skip
    real = np.asarray(truth, dtype=np.float64).reshape(-1)
    real_share = real[top] / real.sum() if real.sum() > 0 else 0.0
    if real_share >= COLLAPSE_SHARE:
        return None
    return (f"{said} (>= {COLLAPSE_SHARE:.0%}), the ground truth {real_share:.1%}: the model "
            "has collapsed to one class; check its training (loss, lr) or the checkpoint")  # fmt: skip


class ClassTally:
    """What a ``cf predict`` run predicted per class (pixels for semantic, the top class of each
    image for classification), for :func:`collapse_warning` once the run is done; tasks
    predicting objects count nothing (they warn per image when they find nothing)."""

    def __init__(self, task: str, names: Sequence[str]) -> None:
        import numpy as np

        self.unit = COLLAPSE_UNITS.get(task)
        self.names = list(names)
        self.counts = np.zeros(len(self.names), dtype=np.int64)
        self.images = 0

    def add(self, prediction: Any) -> None:
        """One :class:`clusterformer.inference.Prediction` (``label_map`` or ``labels``)."""
        import numpy as np

        if self.unit is None or not self.names:
            return
        if self.unit == "pixels":
            ids = np.asarray(prediction.label_map).reshape(-1)
        else:
            ids = np.asarray(prediction.labels).reshape(-1)[:1]
        ids = ids[(ids >= 0) & (ids < len(self.names))]
        self.counts += np.bincount(ids, minlength=len(self.names))
        self.images += 1

    def warning(self) -> str | None:
        if self.unit is None:
            return None
        return collapse_warning(self.counts, self.names, self.images, self.unit)
