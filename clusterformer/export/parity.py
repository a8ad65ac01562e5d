"""Parity of an exported file with the eager model it came from.

The exported file is run (onnxruntime on CPU for ``.onnx``, ``torch.export.load`` for
``.pt2``) on two inputs — ``random`` (standard normal, batch 2) and ``shapes`` (a synthetic
make-shapes scene scaled to ``[0, 1]`` and normalised with the checkpoint's mean/std, batch
1) — at the export size and, for a dynamic export, at a second size that is not a multiple
of 32. Each output is compared with the eager model's:

    abs = max |exported - eager|        rel = abs / max(max |eager|, 1e-6)

and the check passes when ``rel <= tolerance`` (default 1e-4, float32) for every output.
Integer outputs (``labels``) are compared the same way, so any mismatch fails.

Post-processed detection outputs are ranked by score: two (query, class) pairs whose scores
differ by less than the tolerance may legitimately swap places, so ``labels`` and ``boxes``
are compared only at ranks whose score is separated from both neighbours by more than
``tolerance * max score``; ``scores`` (sorted) are compared everywhere. Likewise a semantic
``label_map`` is compared only at pixels whose winning class leads the runner-up by more
than ``tolerance * max score`` (``label_margins``); the scores and margins everywhere, the
margins relative to the scores' scale: a margin is a difference of two scores and carries
their rounding, so an undertrained model whose classes all score alike (margins near 0) is
not failed for float32 noise of its scores.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

EPS = 1e-6
DEFAULT_TOLERANCE = 1e-4


@dataclass(frozen=True)
class ParityResult:
    """One output of one parity run."""

    input: str
    size: tuple[int, int]
    output: str
    max_abs: float
    max_rel: float
    ok: bool


def second_size(size: int) -> tuple[int, int]:
    """A non-square size near ``size`` whose sides are not multiples of 32 (nor of 4)."""
    height, width = size + 13, max(size - 19, 33)
    return (height + 1 if height % 32 == 0 else height, width + 2 if width % 32 == 0 else width)


def parity_inputs(
    sizes: Sequence[tuple[int, int]], mean: Sequence[float], std: Sequence[float], seed: int = 0
) -> list[tuple[str, Tensor]]:
    """``[(name, images (B, 3, H, W))]``: a random and a make-shapes input at every size."""
    from clusterformer.data.shapes_scene import random_scene

    mean_t = torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1)
    generator = torch.Generator().manual_seed(seed)
    out = []
    for height, width in sizes:
        out.append(("random", torch.randn(2, 3, height, width, generator=generator)))
        scene = random_scene(np.random.default_rng([seed, height, width]), max(height, width), 3, False)
        pixels = torch.from_numpy(np.ascontiguousarray(scene.image)).permute(2, 0, 1)
        pixels = pixels[None, :, :height, :width].to(torch.float32) / 255.0
        out.append(("shapes", (pixels - mean_t) / std_t))
    return out


def onnx_runner(path: Path, output_names: Sequence[str]) -> Callable[[Tensor], list[Tensor]]:
    """Run an ``.onnx`` file with onnxruntime (CPU): ``images -> outputs`` in ``output_names`` order."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(images: Tensor) -> list[Tensor]:
        outs = session.run(list(output_names), {"images": images.numpy()})
        return [torch.from_numpy(np.asarray(o)) for o in outs]

    return run


def pt2_runner(path: Path) -> Callable[[Tensor], list[Tensor]]:
    """Run a ``.pt2`` ExportedProgram: ``images -> outputs``.

    ``torch.export.load`` unpickles parts of the archive: call this only on a file this process
    has just written (the parity check does); read a foreign file's metadata with
    :func:`~clusterformer.export.read_export_metadata`, which never unpickles.
    """
    module = torch.export.load(str(path)).module()

    def run(images: Tensor) -> list[Tensor]:
        with torch.no_grad():
            return list(module(images))

    return run


def compare(
    name: str, got: Tensor, ref: Tensor, tolerance: float, keep: Tensor | None = None,
    scale: float | None = None,
) -> tuple[float, float, bool]:  # fmt: skip
    """``(max_abs, max_rel, ok)`` of ``got`` against ``ref`` (optionally only where ``keep``);
    ``rel`` is relative to ``scale`` (default: ``max |ref|``)."""
    if tuple(got.shape) != tuple(ref.shape):
        return float("inf"), float("inf"), False
    got_f, ref_f = got.detach().double(), ref.detach().double()
    finite = ref_f.isfinite()
    if not torch.equal(got_f.isfinite(), finite):
        return float("inf"), float("inf"), False
    diff = torch.where(finite, (got_f - ref_f).abs(), torch.zeros_like(ref_f))
    if keep is not None:
        diff = diff[keep]
    max_abs = float(diff.max()) if diff.numel() else 0.0
    if scale is None:
        scale = float(torch.where(finite, ref_f.abs(), 0.0).max()) if ref_f.numel() else 0.0
    max_rel = max_abs / max(scale, EPS)
    return max_abs, max_rel, max_rel <= tolerance


def unambiguous_ranks(scores: Tensor, tolerance: float) -> Tensor:
    """``(B, k)`` bool: ranks whose score is farther than ``tolerance * max`` from both
    neighbours, i.e. whose (query, class) cannot swap with another under rounding."""
    gap = tolerance * float(scores.abs().max().clamp_min(EPS))
    inf = torch.full_like(scores[:, :1], float("inf"))
    step = (scores[:, 1:] - scores[:, :-1]).abs()
    before, after = torch.cat([inf, step], 1), torch.cat([step, inf], 1)
    return (before > gap) & (after > gap)


def check_parity(
    run: Callable[[Tensor], list[Tensor]],
    eager: nn.Module,
    output_names: Sequence[str],
    inputs: Sequence[tuple[str, Tensor]],
    tolerance: float = DEFAULT_TOLERANCE,
) -> list[ParityResult]:
    """Compare ``run`` with ``eager`` (an ExportWrapper on the original model) on ``inputs``."""
    results = []
    for label, images in inputs:
        with torch.no_grad():
            expected = list(eager(images))
        got = run(images)
        keep, scales = None, {}
        names = list(output_names)
        if "scores" in names and "labels" in names:
            keep = unambiguous_ranks(expected[names.index("scores")], tolerance)
        if "label_map" in names and "label_margins" in names:  # pixels no rounding can flip
            score_scale = float(expected[names.index("label_scores")].abs().max())
            keep = expected[names.index("label_margins")] > tolerance * max(score_scale, EPS)
            scales["label_margins"] = score_scale  # differences of scores: the scores' scale
        size = (int(images.shape[-2]), int(images.shape[-1]))
        for name, g, e in zip(output_names, got, expected, strict=True):
            mask = None
            if keep is not None and name == "label_map":
                mask = keep
            elif keep is not None and name in ("labels", "boxes"):
                mask = keep if name == "labels" else keep.unsqueeze(-1).expand_as(e)
            max_abs, max_rel, ok = compare(name, g, e, tolerance, mask, scales.get(name))
            results.append(ParityResult(label, size, name, max_abs, max_rel, ok))
    return results
