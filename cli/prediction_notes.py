"""The one-line warning ``cf predict`` gives for an image where nothing was found, so that an
overlay identical to the photo is never silent (a model collapsed to one class:
:mod:`clusterformer.inference.collapse`)."""

from __future__ import annotations

from typing import Any

# The record lists a task's ``describe`` fills (clusterformer.tasks.predictions).
RECORD_LISTS = ("detections", "segments", "classes")


def highest_score(prediction: Any) -> float | None:
    """The best score of a raw post-processed prediction (``scores`` tensor or segments with a
    ``score``), ``None`` when it holds no score at all."""
    if not isinstance(prediction, dict):
        return None
    scores = prediction.get("scores")
    if scores is not None and getattr(scores, "numel", lambda: len(scores))():
        return float(max(float(s) for s in scores.reshape(-1).tolist()))
    found = [float(s["score"]) for s in prediction.get("segments") or [] if "score" in s]
    return max(found) if found else None


def empty_prediction_warning(image: str, record: dict[str, Any], prediction: Any,
                             score_threshold: float) -> str | None:  # fmt: skip
    """``warning: IMAGE: ...`` when the image's record lists nothing, else ``None``: below the
    threshold (with the highest score seen), or nothing found at all."""
    lists = [record[k] for k in RECORD_LISTS if isinstance(record.get(k), list)]
    if not lists or any(lists):
        return None
    best = highest_score(prediction)
    if best is not None and best < score_threshold:
        return (f"warning: {image}: nothing scored >= --score-threshold {score_threshold:g} "
                f"(highest score {best:.3g}); the overlay shows nothing")  # fmt: skip
    return f"warning: {image}: the model found nothing in this image; the overlay is the photo"
