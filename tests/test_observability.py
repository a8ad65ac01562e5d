"""What a run shows while it works: the start line, the held-out label, the best checkpoint and
early stop, progress bars that stay off in logs, and warnings for empty predictions."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from cli_runner import run_cf, train_argv

from clusterformer.cli import progress
from clusterformer.cli.metric_table import format_value, unit_of
from clusterformer.cli.prediction_notes import empty_prediction_warning
from clusterformer.data import make_shapes, open_source, write_shards
from clusterformer.engine.best import BestCheckpoint, read_best
from clusterformer.engine.checkpoint import read_metadata
from clusterformer.engine.logging import RunLogger
from clusterformer.tasks import task_spec


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("obs")
    made = make_shapes(root / "raw", num_images=16, image_size=32, seed=0)
    out = {"raw": made}
    for name in ("train", "val"):  # the same pictures, two folders: held out by path
        write_shards(open_source("imagefolder", made["classes"]), root / name, samples_per_shard=8)
        out[name] = root / name
    write_shards(open_source("coco", made["images"], made["instances"]), root / "det",
                 samples_per_shard=16)  # fmt: skip
    out["det"] = root / "det"
    return out


def _run(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    capsys.readouterr()
    code = run_cf([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# ----------------------------------------------------------------------------- tables
@pytest.mark.parametrize(("key", "value", "text", "unit"), [
    ("bbox_AP", 0.0011, "0.0011", "%"), ("bbox_AP", 0.05, "0.050", "%"),
    ("bbox_AP", 12.345, "12.35", "%"), ("bbox_AP", 0.0, "0.00", "%"), ("mIoU", -1.0, "n/a", "%"),
    ("num_images", 128.0, "128", ""), ("num_samples", 8, "8", ""), ("step", 20, "20", ""),
    ("image_size", 224, "224", "px"),
])  # fmt: skip
def test_metric_values_keep_small_digits_and_counts_are_integers(key, value, text, unit) -> None:
    assert format_value(key, value) == text
    assert unit_of(key, value) == unit


# ----------------------------------------------------------------------------- best / early stop
class _Spec:
    name = "demo"

    @staticmethod
    def improves(key: str, value: float, best: float | None) -> bool:
        return task_spec("classification").improves(key, value, best)


def test_best_checkpoint_keeps_the_best_and_stops_after_patience(tmp_path: Path) -> None:
    weights = torch.nn.Linear(2, 2)
    best = BestCheckpoint(tmp_path, _Spec(), "top1", 2, {"task": "classification"})
    notes = []
    for step, value in enumerate([10.0, 30.0, 20.0, 30.0, 25.0], start=1):
        with torch.no_grad():
            weights.weight.fill_(step)
        notes.append(best.observe(step, {"top1": value}, weights))
        if best.should_stop:
            break
    assert step == 4 and "early stop at step 4" in notes[-1] and "best 30 at step 2" in notes[-1]
    assert read_best(tmp_path) == {"metric": "top1", "value": 30.0, "step": 2,
                                   "weights": "best.safetensors", "stale": 2,
                                   "evaluated_step": 4}  # fmt: skip
    meta = read_metadata(tmp_path / "best.safetensors")
    assert meta["step"] == 2 and meta["best_metric"] == "top1" and meta["best_value"] == 30.0
    assert not list(tmp_path.glob(".*tmp*"))  # written whole: no temporaries left
    again = BestCheckpoint(tmp_path, _Spec(), "top1", None, {})  # a resumed run
    again.start()
    assert again.best == 30.0 and again.observe(9, {"top1": 29.0}, weights) is None
    with pytest.raises(ValueError, match="--best-metric mIoU: not a metric"):
        BestCheckpoint(tmp_path, _Spec(), "mIoU", None, {}).observe(10, {"top1": 1.0}, weights)


def test_a_failed_best_write_is_a_warning_not_a_crash(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    from clusterformer.engine import files

    def full(path: Path, data: bytes) -> None:
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(files, "atomic_write_bytes", full)
    best = BestCheckpoint(tmp_path, _Spec(), "top1", None, {"task": "classification"})
    note = best.observe(1, {"top1": 5.0}, torch.nn.Linear(2, 2))
    assert note.startswith("warning: could not write") and "No space left" in note
    assert not (tmp_path / "best.safetensors").exists() and read_best(tmp_path) is None


def test_lower_is_better_metrics_improve_downwards() -> None:
    spec = task_spec("classification")
    assert spec.improves("top1", 2.0, 1.0) and not spec.improves("top1", 1.0, 2.0)
    from dataclasses import replace

    lower = replace(spec, lower_is_better=("top1",))
    assert lower.improves("top1", 1.0, 2.0) and lower.improves("top1", 5.0, None)


def test_train_keeps_best_and_stops_early_on_the_printed_plan(data: dict, tmp_path: Path,
                                                              capsys) -> None:  # fmt: skip
    run = tmp_path / "run"
    code, out, err = _run(train_argv(data["train"], run, 8, "--val-data", data["train"],
                                     "--eval-every", "1", "--patience", "1"), capsys)  # fmt: skip
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("cf: cpu, ")
    assert lines[1].startswith("cf: train classification clusterformer-nano, 32 px; data ")
    assert "(16 samples)" in lines[1] and "not held out" in lines[1] and "8 steps" in lines[1]
    assert f"run folder {run}" in lines[1]
    assert "not held out" in out and "held-out," not in out
    evals = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if r["split"] == "val"]
    top1 = [r["top1"] for r in evals]
    # Expected from the patience rule: stop at the first evaluation not above the best so far.
    stop = next((i for i in range(1, len(top1)) if top1[i] <= max(top1[:i])), None)
    last_step = evals[-1]["step"]
    assert last_step == (stop + 1 if stop is not None else 8)
    best_value = max(top1)
    record = read_best(run / "checkpoints")
    assert record["value"] == best_value and record["step"] == evals[top1.index(best_value)]["step"]
    if stop is not None:
        assert "stopped early" in out
    # best.safetensors is a usable checkpoint scoring what was recorded
    code, printed, err = _run(["eval", "--ckpt", run / "checkpoints" / "best.safetensors",
                               "--data", data["train"], "--out", tmp_path / "best.json"], capsys)  # fmt: skip
    assert code == 0, err
    assert json.loads((tmp_path / "best.json").read_text())["top1"] == pytest.approx(best_value)


def test_held_out_data_is_called_held_out(data: dict, tmp_path: Path, capsys) -> None:
    code, out, err = _run(train_argv(data["train"], tmp_path / "run", 1, "--val-data",
                                     data["val"]), capsys)  # fmt: skip
    assert code == 0, err
    assert f"val {data['val']} (16 samples)" in out and "held-out, step 1" in out
    assert "not held out" not in out
    assert "━" not in err and "\r" not in err  # no bar drawn into a captured (non-TTY) stream
    # cf eval --per-class without --out: the run folder gets per_class.json
    code, out, err = _run(["eval", "--ckpt", tmp_path / "run", "--data", data["val"],
                           "--per-class"], capsys)  # fmt: skip
    assert code == 0, err
    written = json.loads((tmp_path / "run" / "per_class.json").read_text())
    assert set(written["per_class"]) == {"circle", "ellipse", "rectangle", "triangle"}
    assert all(set(row) == {"Acc"} for row in written["per_class"].values())
    assert written["num_samples"] == 16 and "Acc %" in out


@pytest.mark.parametrize("argv", [["--patience", "2"], ["--best-metric", "top1"],
                                  ["--val-data", "VAL", "--best-metric", "mIoU"]])  # fmt: skip
def test_bad_best_settings_are_usage_errors(data: dict, tmp_path: Path, capsys, argv) -> None:
    argv = [str(data["val"]) if a == "VAL" else a for a in argv]
    code, _, err = _run(train_argv(data["train"], tmp_path / "run", 1, *argv), capsys)
    assert code == 2, err
    assert ("need held-out data" in err) or ("not a metric of the classification task" in err)


# ----------------------------------------------------------------------------- progress switch
def test_progress_bars_follow_the_terminal_and_the_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CF_NO_PROGRESS", raising=False)
    monkeypatch.setattr(progress, "DISABLED", False)
    monkeypatch.setattr("sys.stderr.isatty", lambda: True, raising=False)
    assert progress.progress_enabled()
    monkeypatch.setenv("CF_NO_PROGRESS", "1")
    assert not progress.progress_enabled()
    monkeypatch.delenv("CF_NO_PROGRESS")
    monkeypatch.setattr(progress, "DISABLED", True)
    assert not progress.progress_enabled()
    with progress.progress_bar("x", 3) as advance:
        advance()  # a no-op, never an error


def test_run_logger_without_progress_prints_plain_lines_on_a_tty(tmp_path: Path) -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Tty()
    with RunLogger(tmp_path, 4, stream=stream, progress=False) as log:
        log.log_train(1, {"loss": 1.5, "lr": 1e-3})
    assert stream.getvalue().startswith("step 1/4  loss 1.5  lr 1.00e-03")


# ----------------------------------------------------------------------------- empty predictions
def test_empty_prediction_warning_names_the_highest_score() -> None:
    pred = {"scores": torch.tensor([0.12, 0.05]), "labels": torch.tensor([0, 1])}
    line = empty_prediction_warning("a.jpg", {"detections": []}, pred, 0.3)
    assert line == ("warning: a.jpg: nothing scored >= --score-threshold 0.3 (highest score "
                    "0.12); the overlay shows nothing")  # fmt: skip
    assert empty_prediction_warning("a.jpg", {"detections": [{"score": 0.5}]}, pred, 0.3) is None
    nothing = empty_prediction_warning("b.png", {"segments": []}, {"segments": []}, 0.3)
    assert nothing == "warning: b.png: the model found nothing in this image; the overlay is the photo"
    assert empty_prediction_warning("c.png", {"classes": [{"score": 0.9}]}, None, 0.3) is None


@pytest.fixture(scope="module")
def det_run(data: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1-step detection run (its scores are all low: nothing passes a high threshold)."""
    run = tmp_path_factory.mktemp("detrun") / "run"
    argv = ["train", "--task", "detection", "--data", data["det"], "--out", run, "--steps", "1",
            "--batch-size", "4", "--image-size", "32"]  # fmt: skip
    assert run_cf([str(a) for a in argv]) == 0
    return run


def test_cf_predict_warns_when_nothing_passes_the_threshold(data: dict, det_run: Path,
                                                            tmp_path: Path, capsys) -> None:  # fmt: skip
    image = sorted(Path(data["raw"]["images"]).glob("*.jpg"))[0]
    code, out, err = _run(["predict", "--ckpt", det_run, image, "--out", tmp_path / "p",
                           "--score-threshold", "1.0"], capsys)  # fmt: skip
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and str(image) in warnings[0] and "highest score 0." in warnings[0]
    assert "warning" not in out  # stdout keeps only what it always printed
    code, out, err = _run(["predict", "--ckpt", det_run, image, "--out", tmp_path / "p2",
                           "--score-threshold", "0.0"], capsys)  # fmt: skip
    assert code == 0 and "warning" not in err, err


def test_checkpoint_eval_per_class_detection(data: dict, det_run: Path, tmp_path: Path,
                                             capsys) -> None:  # fmt: skip
    out = tmp_path / "m.json"
    code, printed, err = _run(["eval", "--ckpt", det_run, "--data", data["det"], "--per-class",
                               "--batch-size", "8", "--out", out], capsys)  # fmt: skip
    assert code == 0, err
    written = json.loads(out.read_text())
    assert {"bbox_AP", "bbox_APs", "bbox_APm", "bbox_APl", "bbox_AR100", "step"} <= set(written)
    assert set(written["per_class"]) == {"circle", "ellipse", "rectangle", "triangle"}
    assert all(set(r) == {"bbox_AP"} for r in written["per_class"].values())
    assert isinstance(written["num_images"], int) and written["num_images"] == 16
    assert (tmp_path / "m.detections.json").is_file()  # predictions still written beside


def test_long_commands_drive_a_progress_bar(data: dict, tmp_path: Path, capsys,
                                            monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    import contextlib

    bars: list[dict] = []

    @contextlib.contextmanager
    def recording_bar(label: str, total: int | None):
        bar = {"label": label, "total": total, "done": 0}
        bars.append(bar)

        def update(advance: int = 1, description: str | None = None,
                   completed: int | None = None) -> None:  # fmt: skip
            bar["done"] = completed if completed is not None else bar["done"] + advance

        yield update

    monkeypatch.setattr(progress, "progress_bar", recording_bar)
    shards = tmp_path / "shards"
    code, _, err = _run(["shard-dataset", "--format", "imagefolder", "--images",
                         data["raw"]["classes"], "--out", shards], capsys)  # fmt: skip
    assert code == 0, err
    run = tmp_path / "run"
    assert _run(train_argv(shards, run, 1), capsys)[0] == 0
    code, _, err = _run(["eval", "--ckpt", run, "--data", shards, "--batch-size", "4"], capsys)
    assert code == 0, err
    images = sorted(Path(data["raw"]["classes"]).rglob("*.jpg"))[:3]
    code, _, err = _run(["predict", "--ckpt", run, *images, "--out", tmp_path / "p"], capsys)
    assert code == 0, err
    assert [(b["label"], b["total"], b["done"]) for b in bars] == [
        ("sharding", 16, 16), ("eval", 4, 4), ("predict", 3, 3)]
