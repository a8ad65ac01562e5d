"""`cf eval --task instance|semantic|panoptic --predictions PATH --data SHARDS` end to end,
and one-line errors naming the file for malformed predictions."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cli_runner import run_cf as _cf
from PIL import Image

from clusterformer.data import make_shapes, open_source, write_shards
from clusterformer.data.images import decode_panoptic_png, encode_panoptic_ids
from clusterformer.data.records import segmentation_to_mask
from clusterformer.metrics.instance import encode_masks


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("evalseg")
    made = make_shapes(root / "raw", num_images=4, image_size=48, seed=0)
    out = {"root": root, "made": made}
    for task, args in (
        ("instance", ("coco", made["images"], made["instances"])),
        (
            "panoptic",
            ("coco-panoptic", made["images"], made["panoptic_json"], made["panoptic_masks"]),
        ),
        ("semantic", ("ade20k", made["images"], None, made["semantic_masks"])),
    ):
        write_shards(open_source(*args), root / task, samples_per_shard=2)
        out[task] = root / task
    doc = json.loads(Path(made["instances"]).read_text())
    sizes = {im["id"]: (im["height"], im["width"]) for im in doc["images"]}
    results = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "score": 1.0,
         "segmentation": encode_masks(segmentation_to_mask(a["segmentation"],
                                                           *sizes[a["image_id"]])[None])[0]}
        for a in doc["annotations"] if not a["iscrowd"]
    ]  # fmt: skip
    (root / "instances_results.json").write_text(json.dumps(results))
    return out




def _eval(task: str, predictions: Path, data: Path, capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = _cf(["eval", "--task", task, "--predictions", str(predictions), "--data", str(data)])
    return code, capsys.readouterr().err.strip()


def test_ground_truth_scores_100_through_the_cli(data, tmp_path):
    cases = {
        "panoptic": (data["made"]["panoptic_json"], ("PQ", "SQ", "RQ", "PQ_th", "PQ_st")),
        "semantic": (data["made"]["semantic_masks"], ("mIoU", "aAcc")),
        "instance": (data["root"] / "instances_results.json",
                     ("segm_AP", "segm_AP50", "segm_AP75", "bbox_AP", "bbox_AP50", "bbox_AP75")),
    }  # fmt: skip
    for task, (predictions, keys) in cases.items():
        out = tmp_path / f"{task}.json"
        if task == "panoptic":  # one run through a real subprocess, as a user would
            proc = subprocess.run(
                [sys.executable, "-m", "clusterformer.cli", "eval", "--task", task,
                 "--predictions", str(predictions), "--data", str(data[task]), "--out", str(out)],
                capture_output=True, text=True, timeout=600,
            )  # fmt: skip
            assert proc.returncode == 0, proc.stderr
            assert "PQ" in proc.stdout
        else:
            assert _cf(["eval", "--task", task, "--predictions", str(predictions),
                        "--data", str(data[task]), "--out", str(out)]) == 0  # fmt: skip
        metrics = json.loads(out.read_text())
        assert all(metrics[k] == 100.0 for k in keys), (task, metrics)
        assert metrics["num_images"] == 4


def _copy_panoptic(data: dict, tmp_path: Path) -> tuple[Path, dict]:
    made = data["made"]
    pred = tmp_path / "pred.json"
    shutil.copytree(made["panoptic_masks"], tmp_path / "pred")
    doc = json.loads(Path(made["panoptic_json"]).read_text())
    pred.write_text(json.dumps(doc))
    return pred, doc


def test_panoptic_errors(data, tmp_path, capsys):
    pred, doc = _copy_panoptic(data, tmp_path)
    first = doc["annotations"][0]
    png = tmp_path / "pred" / first["file_name"]

    png.unlink()
    code, err = _eval("panoptic", pred, data["panoptic"], capsys)
    assert code != 0 and err.count("\n") == 0
    assert str(png) in err and "not found" in err

    ids = decode_panoptic_png(
        (Path(data["made"]["panoptic_masks"]) / first["file_name"]).read_bytes()
    )
    extra = ids.copy()
    extra[:2, :2] = 999
    Image.fromarray(encode_panoptic_ids(extra)).save(png)
    code, err = _eval("panoptic", pred, data["panoptic"], capsys)
    assert code != 0 and str(png) in err and "[999]" in err and "not in segments_info" in err

    Image.fromarray(encode_panoptic_ids(ids[:, :-3])).save(png)
    code, err = _eval("panoptic", pred, data["panoptic"], capsys)
    assert code != 0 and str(png) in err and "prediction is 45x48" in err

    Image.fromarray(encode_panoptic_ids(ids)).save(png)
    assert _eval("panoptic", pred, data["panoptic"], capsys)[0] == 0
    pred.write_text('{"annotations": [')
    code, err = _eval("panoptic", pred, data["panoptic"], capsys)
    assert code != 0 and str(pred) in err and "not valid JSON" in err

    pred.write_text(json.dumps({"annotations": doc["annotations"][1:]}))
    code, err = _eval("panoptic", pred, data["panoptic"], capsys)
    assert code != 0 and str(pred) in err and f"image id {first['image_id']}" in err

    shutil.rmtree(tmp_path / "pred")
    code, err = _eval("panoptic", pred, data["panoptic"], capsys)
    assert code != 0 and str(tmp_path / "pred") in err and "PNG folder" in err


def test_semantic_errors(data, tmp_path, capsys):
    folder = tmp_path / "sem"
    shutil.copytree(data["made"]["semantic_masks"], folder)
    first = sorted(folder.glob("*.png"))[0]
    values = np.asarray(Image.open(first))

    Image.fromarray(np.full_like(values, 200)).save(first)
    code, err = _eval("semantic", folder, data["semantic"], capsys)
    assert code != 0 and str(first) in err and "[200]" in err

    Image.fromarray(values[:-1]).save(first)
    code, err = _eval("semantic", folder, data["semantic"], capsys)
    assert code != 0 and str(first) in err and "48x47" in err

    first.unlink()
    code, err = _eval("semantic", folder, data["semantic"], capsys)
    assert code != 0 and str(first) in err and "not found" in err and err.count("\n") == 0

    code, err = _eval("semantic", tmp_path / "nowhere", data["semantic"], capsys)
    assert code != 0 and "nowhere" in err


def test_instance_errors_and_wrong_data(data, tmp_path, capsys):
    bad = tmp_path / "res.json"
    bad.write_text("{oops")
    code, err = _eval("instance", bad, data["instance"], capsys)
    assert code != 0 and str(bad) in err and "not valid JSON" in err
    code, err = _eval("instance", tmp_path / "missing.json", data["instance"], capsys)
    assert code != 0 and "missing.json" in err and "not found" in err
    # Panoptic predictions against COCO instance shards: the data cannot score them.
    code, err = _eval("panoptic", Path(data["made"]["panoptic_json"]), data["instance"], capsys)
    assert code != 0 and "cannot score panoptic" in err
