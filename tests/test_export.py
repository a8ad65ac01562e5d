"""`cf export`: ONNX and torch.export programs of trained checkpoints, their metadata and the
parity check against eager. Exports are slow to trace on two cores: one classification ONNX
export runs by default, the other formats/tasks are marked slow."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_runner import run_cf as _cf

from clusterformer.data import make_shapes, open_source, write_shards
from clusterformer.engine.config_files import resolve_config
from clusterformer.engine.loop import train
from clusterformer.export import parity, read_export_metadata
from clusterformer.tasks import task_spec
from clusterformer.tasks.detection import postprocess_detections

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("export")
    made = make_shapes(root / "shapes", num_images=4, image_size=64, seed=0)
    sources = {
        "classification": open_source("imagefolder", Path(made["classes"])),
        "detection": open_source("coco", made["images"], made["instances"]),
        "panoptic": open_source("coco-panoptic", made["images"], made["panoptic_json"],
                                made["panoptic_masks"]),
    }
    out = {}
    for task, source in sources.items():
        write_shards(source, root / f"{task}-shards", samples_per_shard=4)
        cfg = resolve_config(task=task, data=str(root / f"{task}-shards"),
                             out=str(root / task), model="clusterformer-nano", steps=1,
                             batch_size=2, image_size=48, lr=1e-3, device="cpu", log_every=1)
        out[task] = train(cfg, handle_signals=False).run_dir
    return out




def _run_exported(path: Path, images: torch.Tensor, names: list[str]) -> list[torch.Tensor]:
    if path.suffix == ".onnx":
        return parity.onnx_runner(path, names)(images)
    return parity.pt2_runner(path)(images)


def _export_and_check(run: Path, fmt: str, out: Path, task: str, extra: list[str],
                      capsys: pytest.CaptureFixture) -> dict:
    code = _cf(["export", "--ckpt", str(run), "--format", fmt, "--out", str(out), *extra])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert out.is_file() and not list(out.parent.glob(f".{out.stem}*"))  # no temp left
    meta = read_export_metadata(out)
    ckpt_meta = json.loads((run / "config.json").read_text())
    assert meta["task"] == task == ckpt_meta["task"]["name"]
    assert meta["preset"] == "clusterformer-nano"
    things = sorted(c["name"] for c in meta["categories"] if c.get("isthing", True))
    assert things == ["circle", "ellipse", "rectangle", "triangle"]
    assert len(meta["normalisation"]["mean"]) == len(meta["normalisation"]["std"]) == 3
    assert meta["image_size"] == 48
    # the parity table names every output at both sizes, one of them not a multiple of 32
    for name in meta["outputs"]:
        assert name in captured.out
    if "--image-size" not in extra:
        assert "48x48" in captured.out and "61x33" in captured.out
    return meta


def test_classification_onnx_dynamic(runs: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "cls.onnx"
    meta = _export_and_check(runs["classification"], "onnx", out, "classification", [], capsys)
    assert meta["outputs"] == ["logits"] and meta["exporter"] == "torch.onnx (dynamo)"
    assert meta["input"]["height"] == "dynamic" and meta["opset"] == 18
    import onnx

    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert props["task"] == "classification" and json.loads(props["mean"]) == meta["normalisation"]["mean"]
    # run it ourselves at a third size and batch: matches eager within tolerance
    from clusterformer.engine.evaluate import load_model_from_checkpoint

    model, _, _ = load_model_from_checkpoint(runs["classification"])
    images = torch.randn(3, 3, 45, 70)
    (logits,) = _run_exported(out, images, meta["outputs"])
    with torch.no_grad():
        expected = model(images)
    assert logits.shape == (3, 4)
    assert (logits - expected).abs().max() <= 1e-4 * expected.abs().max()


@pytest.mark.slow
def test_classification_pt2_and_static_postprocess(runs: dict, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    meta = _export_and_check(runs["classification"], "pt2", tmp_path / "cls.pt2",
                             "classification", [], capsys)
    assert meta["exporter"] == "torch.export" and meta["outputs"] == ["logits"]
    out = tmp_path / "cls-post.onnx"
    meta = _export_and_check(runs["classification"], "onnx", out, "classification",
                             ["--image-size", "64", "--with-postprocess"], capsys)
    assert meta["outputs"] == ["probs"] and meta["input"]["height"] == 64
    (probs,) = _run_exported(out, torch.randn(2, 3, 64, 64), ["probs"])
    assert torch.allclose(probs.sum(-1), torch.ones(2), atol=1e-5) and (probs >= 0).all()


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_detection_export(runs: dict, tmp_path: Path, capsys: pytest.CaptureFixture, fmt: str) -> None:
    raw = _export_and_check(runs["detection"], fmt, tmp_path / f"det.{fmt}", "detection", [], capsys)
    assert raw["outputs"] == ["pred_logits", "pred_boxes"]
    out = tmp_path / f"det-post.{fmt}"
    meta = _export_and_check(runs["detection"], fmt, out, "detection", ["--with-postprocess"], capsys)
    assert meta["outputs"] == ["scores", "labels", "boxes"]
    scores, labels, boxes = _run_exported(out, torch.randn(2, 3, 50, 75), meta["outputs"])
    assert scores.shape == labels.shape == (2, 100) and boxes.shape == (2, 100, 4)
    assert (scores[:, :-1] >= scores[:, 1:]).all() and ((scores >= 0) & (scores <= 1)).all()
    assert labels.dtype == torch.int64 and ((labels >= 0) & (labels < 4)).all()
    assert (boxes[..., 0] <= boxes[..., 2]).all() and (boxes[..., 1] <= boxes[..., 3]).all()
    assert (boxes[..., 0::2] <= 75).all() and (boxes[..., 1::2] <= 50).all() and (boxes >= 0).all()


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_panoptic_export(runs: dict, tmp_path: Path, capsys: pytest.CaptureFixture, fmt: str) -> None:
    meta = _export_and_check(runs["panoptic"], fmt, tmp_path / f"pan.{fmt}", "panoptic", [], capsys)
    assert meta["outputs"] == ["pred_logits", "pred_masks"]
    logits, masks = _run_exported(tmp_path / f"pan.{fmt}", torch.randn(1, 3, 50, 75), meta["outputs"])
    assert logits.shape[0] == masks.shape[0] == 1 and masks.shape[-2:] == (13, 19)
    code = _cf(["export", "--ckpt", str(runs["panoptic"]), "--format", fmt,
                "--out", str(tmp_path / f"post.{fmt}"), "--with-postprocess"])
    assert code != 0 and "post" in capsys.readouterr().err


@pytest.mark.slow
def test_parity_failure_keeps_a_clearly_failed_file(runs: dict, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "cls.onnx"
    out.write_bytes(b"stale")  # an older export must not survive looking good
    code = _cf(["export", "--ckpt", str(runs["classification"]), "--format", "onnx", "--out",
                str(out), "--image-size", "48", "--tolerance", "1e-15"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "parity check failed" in err[0]
    assert not out.exists() and (tmp_path / "cls.parity-failed.onnx").is_file()


def test_bad_input_gives_one_line_errors(runs: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cases = [
        (["--ckpt", str(tmp_path / "missing"), "--format", "onnx", "--out", str(tmp_path / "a.onnx")], "missing"),
        (["--ckpt", str(runs["classification"]), "--format", "tflite", "--out", str(tmp_path / "a.onnx")], "--format"),
        (["--ckpt", str(runs["classification"]), "--format", "pt2", "--out", str(tmp_path / "a.onnx")], ".pt2"),
        (["--ckpt", str(runs["classification"]), "--format", "onnx", "--out", str(tmp_path / "a.onnx"),
          "--image-size", "8"], "--image-size"),
        (["--ckpt", str(runs["classification"]), "--format", "onnx", "--out", str(tmp_path / "a.onnx"),
          "--opset", "13"], "--opset"),
    ]
    bogus = tmp_path / "bogus.safetensors"
    bogus.write_bytes(b"not a checkpoint")
    cases.append((["--ckpt", str(bogus), "--format", "pt2", "--out", str(tmp_path / "b.pt2")], "bogus"))
    for args, needle in cases:
        code = _cf(["export", *args])
        err = capsys.readouterr().err.strip().splitlines()
        assert code != 0 and len(err) == 1 and needle in err[0], (args, err)
    assert not list(tmp_path.glob("*.onnx")) and not list(tmp_path.glob("*.pt2"))


def test_detection_topk_matches_task_postprocess() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 30, 5, generator=generator)
    boxes = torch.rand(2, 30, 4, generator=generator) * 0.6 + 0.2
    images = torch.zeros(2, 3, 40, 70)
    scores, labels, xyxy = task_spec("detection").export.postprocess((logits, boxes), images)
    expected = postprocess_detections(logits, boxes, [(40, 70), (40, 70)], top_k=100)
    for i, exp in enumerate(expected):
        assert torch.equal(scores[i], exp["scores"]) and torch.equal(labels[i], exp["labels"])
        assert torch.allclose(xyxy[i], exp["boxes"], atol=1e-5)


def test_semantic_margins_are_judged_on_the_scores_scale() -> None:
    """A margin is a difference of two scores: an undertrained model whose classes score alike
    (margins near 0, scores near 6) passes with float32 noise of its scores (1e-5; relative to
    the margins' own max that was 2.5e-4 and failed cf export), and fails with a real error."""
    names = ("label_map", "label_scores", "label_margins")
    scores = torch.full((1, 4, 4), 6.0)
    margins = torch.full((1, 4, 4), 0.05)
    label_map = torch.zeros((1, 4, 4), dtype=torch.long)

    def eager(images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return label_map, scores, margins

    def exported(noise: float):  # noqa: ANN202 - a runner
        return lambda images: [label_map, scores + noise, margins + noise]

    inputs = [("shapes", torch.zeros(1, 3, 4, 4))]
    results = parity.check_parity(exported(1.3e-5), eager, names, inputs, 1e-4)
    assert all(r.ok for r in results), results
    failed = [r.output for r in parity.check_parity(exported(1e-2), eager, names, inputs, 1e-4) if not r.ok]
    assert failed == ["label_scores", "label_margins"]


def test_parity_helpers() -> None:
    for size in (32, 48, 64, 224, 320, 512):
        h, w = parity.second_size(size)
        assert h % 32 and w % 32 and min(h, w) >= 32 and (h, w) != (size, size)
    ref = torch.tensor([1.0, -2.0, 4.0])
    assert parity.compare("x", ref + 1e-5, ref, 1e-4)[2]
    max_abs, max_rel, ok = parity.compare("x", ref + torch.tensor([0, 0, 1e-2]), ref, 1e-4)
    assert not ok and max_abs == pytest.approx(1e-2, rel=1e-4) and max_rel == pytest.approx(2.5e-3, rel=1e-4)
    assert not parity.compare("x", torch.zeros(2), ref, 1e-4)[2]  # shape mismatch
    assert not parity.compare("x", torch.tensor([1.0, float("nan"), 4.0]), ref, 1e-4)[2]
    scores = torch.tensor([[0.9, 0.5, 0.5 - 1e-7, 0.1]])
    assert parity.unambiguous_ranks(scores, 1e-4).tolist() == [[True, False, False, True]]
    inputs = parity.parity_inputs([(40, 57)], [0.5] * 3, [0.25] * 3)
    assert [name for name, _ in inputs] == ["random", "shapes"]
    shapes = inputs[1][1]
    assert shapes.shape == (1, 3, 40, 57) and shapes.min() >= -2 and shapes.max() <= 2
    assert np.unique(shapes.numpy()).size > 10  # a real-looking picture, not a constant
