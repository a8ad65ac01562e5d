"""Same preprocessing everywhere: the ONNX file, run on an image through the README's numpy/PIL
snippet and the checkpoint's ``preprocess`` record, gives what ``cf predict`` gives (top class
and scores to 1e-4; detection boxes and scores), on a synthetic image everywhere and on real
photos from the shared samples. Exports take a minute or more each on two cores: one per task,
shared by the tests of the module; the classification one runs by default, the detection and
semantic ones are marked slow (``nox -s slow``)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from cli_runner import run_cf
from PIL import Image

from clusterformer.data import make_shapes, open_source, write_shards
from clusterformer.engine.config_files import resolve_config
from clusterformer.engine.loop import train

ort = pytest.importorskip("onnxruntime")

README = Path(__file__).resolve().parents[1] / "README.md"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"
if not SHARED.is_dir():
    SHARED = Path("/work/shared/datasets")
FLOWER = SHARED / "classification" / "tf_flowers_cc_by" / "daisy"
COCO = SHARED / "coco_instances" / "coco128_train2017" / "images"


def readme_preprocess():
    """The README's ``preprocess`` function, taken from its onnxruntime snippet."""
    blocks = re.findall(r"```py\n(.*?)```", README.read_text(), flags=re.S)
    block = next(b for b in blocks if "def preprocess(" in b)
    code = block[: block.index("session = ")]
    scope: dict = {}
    exec(compile(code, str(README), "exec"), scope)
    return scope["preprocess"]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("parity")
    made = make_shapes(root / "shapes", num_images=4, image_size=64, seed=0)
    # a non-square photo-like image: both the resize and the centre crop have work to do
    scene = Image.open(sorted(Path(made["images"]).glob("*"))[0]).convert("RGB")
    scene.resize((93, 70), Image.BILINEAR).save(root / "scene.png")
    return {"made": made, "root": root, "scene": root / "scene.png"}


def _train(shapes: dict, task: str, source_args: tuple) -> Path:
    root = shapes["root"]
    write_shards(open_source(*source_args), root / f"{task}-shards", samples_per_shard=4)
    cfg = resolve_config(task=task, data=str(root / f"{task}-shards"), out=str(root / task),
                         model="clusterformer-nano", steps=1, batch_size=2, image_size=48,
                         lr=1e-3, device="cpu", log_every=1)  # fmt: skip
    return train(cfg, handle_signals=False).run_dir


def _export(run: Path, out: Path, *extra: str) -> ort.InferenceSession:
    assert run_cf(["export", "--ckpt", str(run), "--format", "onnx", "--out", str(out),
                   *extra]) == 0  # fmt: skip
    return ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])


def _predict(run: Path, image: Path, out: Path, *extra: str) -> dict:
    assert run_cf(["predict", str(image), "--ckpt", str(run), "--out", str(out), *extra]) == 0
    return json.loads((out / f"{image.stem}.json").read_text())


@pytest.fixture(scope="module")
def classifier(shapes: dict) -> tuple[Path, ort.InferenceSession]:
    run = _train(shapes, "classification", ("imagefolder", Path(shapes["made"]["classes"])))
    return run, _export(run, shapes["root"] / "cls.onnx")


def _check_classification(run: Path, session, image: Path, out: Path) -> None:
    meta = json.loads(session.get_modelmeta().custom_metadata_map["clusterformer"])
    images = readme_preprocess()(image, meta["preprocess"])
    (logits,) = session.run(["logits"], {"images": images})
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs = (probs / probs.sum(-1, keepdims=True))[0]
    expected = _predict(run, image, out)["classes"]
    assert expected[0]["train_id"] == int(probs.argmax())
    for entry in expected:  # cf predict rounds scores to 4 decimals
        assert abs(probs[entry["train_id"]] - entry["score"]) <= 1e-4, entry


def test_checkpoint_and_export_carry_one_preprocess_record(classifier) -> None:
    from clusterformer.engine.checkpoint import read_metadata

    run, session = classifier
    stored = read_metadata(run)["preprocess"]
    exported = json.loads(session.get_modelmeta().custom_metadata_map["clusterformer"])
    # 64 px images trained at 48: ImageNet's rule (short side 55, centre crop 48)
    assert stored == exported["preprocess"]
    assert (stored["resize"], stored["resize_to"], stored["crop"], stored["size"]) == (
        "short_side", 55, 48, 48)


def test_onnx_matches_cf_predict_on_a_synthetic_image(classifier, shapes, tmp_path) -> None:
    run, session = classifier
    _check_classification(run, session, shapes["scene"], tmp_path / "pred")


@pytest.fixture(scope="module")
def detector(shapes: dict) -> tuple[Path, ort.InferenceSession]:
    made = shapes["made"]
    run = _train(shapes, "detection", ("coco", made["images"], made["instances"]))
    return run, _export(run, shapes["root"] / "det.onnx", "--with-postprocess")


def _check_detection(run: Path, session, image: Path, out: Path) -> None:
    meta = json.loads(session.get_modelmeta().custom_metadata_map["clusterformer"])
    assert meta["preprocess"]["resize"] == "long_side" and meta["preprocess"]["crop"] is None
    images = readme_preprocess()(image, meta["preprocess"])
    scores, labels, boxes = (a[0] for a in session.run(["scores", "labels", "boxes"],
                                                       {"images": images}))  # fmt: skip
    width, height = Image.open(image).size
    boxes = boxes * np.array([width / images.shape[3], height / images.shape[2]] * 2)
    found = _predict(run, image, out, "--score-threshold", "0")["detections"]
    assert len(found) == len(scores) == 100
    got = np.array([d["score"] for d in found])
    assert np.abs(np.sort(got)[::-1] - scores).max() <= 1e-4
    # every detection cf predict reports is in the ONNX output: same class, score and box
    # (matched as a set: a 1-step model's scores nearly tie, so ranks may swap)
    tol = 0.02 + 1e-3 * max(width, height)  # cf predict rounds boxes to 2 decimals
    for det in found:
        same = (labels == det["train_id"]) & (np.abs(scores - det["score"]) <= 1e-4)
        assert same.any(), det
        assert np.abs(boxes[same] - np.array(det["box_xyxy"])).max(-1).min() <= tol, det


@pytest.mark.slow
def test_detection_onnx_matches_cf_predict_on_a_synthetic_image(detector, shapes, tmp_path) -> None:
    run, session = detector
    _check_detection(run, session, shapes["scene"], tmp_path / "pred")


@pytest.mark.shared_data
@pytest.mark.parametrize("model", ["classifier", pytest.param("detector", marks=pytest.mark.slow)])
def test_onnx_matches_cf_predict_on_real_photos(model: str, request, tmp_path) -> None:
    folder, count, check = {"classifier": (FLOWER, 2, _check_classification),
                            "detector": (COCO, 1, _check_detection)}[model]  # fmt: skip
    if not folder.is_dir():
        pytest.skip(f"{folder} not present")
    run, session = request.getfixturevalue(model)
    for photo in sorted(folder.glob("*.jpg"))[:count]:
        check(run, session, photo, tmp_path / photo.stem)


@pytest.mark.slow
def test_semantic_with_postprocess_gives_the_label_map_of_cf_predict(shapes, tmp_path) -> None:
    import torch

    from clusterformer.data import decode_image
    from clusterformer.data.preprocess import eval_transform
    from clusterformer.engine.evaluate import eval_preprocess, load_model_from_checkpoint

    made = shapes["made"]
    run = _train(shapes, "semantic", ("ade20k", made["images"], made["classes_json"], made["semantic_masks"]))
    session = _export(run, tmp_path / "sem.onnx", "--with-postprocess")
    model, task, meta = load_model_from_checkpoint(run)
    for image_path in (shapes["scene"], *sorted(Path(made["images"]).glob("*"))[:1]):
        image = decode_image(image_path.read_bytes())
        sample = eval_transform(eval_preprocess(meta))({"image": image})
        images = sample["image"][None]
        label_map, scores, margins = session.run(
            ["label_map", "label_scores", "label_margins"], {"images": images.numpy()})
        size = tuple(sample["size"])  # what cf predict does, before the resize back
        batch = {"images": images, "pixel_mask": torch.ones(1, *size, dtype=torch.bool),
                 "targets": [{"size": size, "orig_size": size}]}
        with torch.no_grad():
            expected = task.postprocess(task.forward(model, batch), batch)[0].numpy()
        assert label_map.shape == (1, *size) and label_map.dtype == np.int64
        clear = margins[0] > 1e-4 * scores.max()
        assert clear.mean() > 0.9
        assert (label_map[0][clear] == expected[clear]).all()
