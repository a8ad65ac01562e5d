"""Inference as a library: ``clusterformer.load(checkpoint)`` gives a :class:`Predictor` that
takes paths, PIL images, numpy arrays and tensors and returns typed predictions whose
``to_dict()`` is ``cf predict``'s record and whose ``draw()`` is its overlay.

Layer: imports ``ops``, ``models``, ``tasks``, ``engine`` and ``data``; only ``cli`` imports it.
"""

from clusterformer.inference.collapse import ClassTally, collapse_warning
from clusterformer.inference.predictions import (
    ClassificationPrediction,
    DetectionPrediction,
    InstancePrediction,
    PanopticPrediction,
    Prediction,
    Segment,
    SemanticPrediction,
)
from clusterformer.inference.predictor import Predictor, SettingError, check_settings, load

__all__ = [
    "ClassTally",
    "ClassificationPrediction",
    "DetectionPrediction",
    "InstancePrediction",
    "PanopticPrediction",
    "Prediction",
    "Predictor",
    "Segment",
    "SemanticPrediction",
    "SettingError",
    "check_settings",
    "collapse_warning",
    "load",
]
