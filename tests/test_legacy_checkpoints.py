"""Checkpoints written before the speed work load and give the same outputs.

The fixture (``tests/fixtures/legacy``) was written by ``tests/fixtures/make_legacy_checkpoints.py``
at commit 6331372, before any fast path existed: small models of every task and every Table S1
mixer variant, with their outputs at a whole-window size (224), a padded size (75x103) and a
padded batch with a pixel mask. A fast path that changes the math or renames a parameter fails
here.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from clusterformer.engine.evaluate import load_model_from_checkpoint

FIXTURES = Path(__file__).parent / "fixtures"
sys.path.insert(0, str(FIXTURES))
from make_legacy_checkpoints import MODELS, as_float, flatten  # noqa: E402

LEGACY = FIXTURES / "legacy"
RTOL = 1e-5  # max |new - old| / max |old| per tensor (the bound)


def _outputs(model: torch.nn.Module, task: str, data: dict[str, torch.Tensor]) -> dict:
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        flatten("whole", model(as_float(data["whole"])), out)
        flatten("odd", model(as_float(data["odd"])), out)
        flatten("batch_padded",
                model(as_float(data["batch_padded"]), data["batch_padded_mask"]), out)
        if task == "classification":
            flatten("features.odd", model.forward_pyramid(as_float(data["odd"]))[0], out)
    return out


@pytest.mark.parametrize("label", list(MODELS))
def test_legacy_checkpoint_gives_its_recorded_outputs(label: str) -> None:
    task = MODELS[label][0]
    model, _, meta = load_model_from_checkpoint(LEGACY / f"{label}.safetensors")
    assert meta["task"] == task
    expected = load_file(str(LEGACY / f"{label}.outputs.safetensors"))
    got = _outputs(model, task, load_file(str(LEGACY / "inputs.safetensors")))
    assert sorted(got) == sorted(expected)
    for key, want in expected.items():
        scale = want.abs().max().clamp_min(1e-6)
        err = ((got[key] - want).abs().max() / scale).item()
        assert err <= RTOL, f"{label} {key}: relative difference {err:.2e}"
