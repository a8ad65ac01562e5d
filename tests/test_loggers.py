"""``cf train --logger``: TensorBoard, MLflow (file store) and W&B (offline) get the config and
the same scalars as metrics.jsonl, read back with each package's own reader; a missing package
stops the run with one line before training."""

from __future__ import annotations

import importlib.util
import json
import struct
import sys
from pathlib import Path

import pytest
from cli_runner import run_cf, train_argv
from fault_kit import error_line

from clusterformer.engine.config import LOGGERS
from clusterformer.engine.loggers import HOOKS, chosen_loggers, flat_config, scalars_of

PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}


@pytest.fixture(scope="module")
def logged_run(fault_shards, tmp_path_factory):  # noqa: ANN001, ANN201
    """One 3-step run (evaluated at steps 2 and 3) logged to every logger installed here."""
    installed = [name for name in LOGGERS if importlib.util.find_spec(PACKAGES[name])]
    if not installed:
        pytest.skip("none of tensorboard, mlflow, wandb is installed")
    run = tmp_path_factory.mktemp("loggers") / "run"
    argv = train_argv(fault_shards, run, 3, "--val-data", str(fault_shards), "--eval-every", "2",
                      "--log-every", "1", "--logger", ",".join(installed))  # fmt: skip
    with pytest.MonkeyPatch.context() as env:
        env.setenv("WANDB_MODE", "online")  # offline all the same: the hook says so
        assert run_cf(argv) == 0
    return run


def _jsonl_series(run: Path, split: str, key: str) -> dict[int, float]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in lines if r["split"] == split and key in r}


def _config(run: Path) -> dict:
    return json.loads((run / "config.json").read_text())


# ----------------------------------------------------------------------------- pure parts
def test_every_configurable_logger_has_a_hook():
    assert set(LOGGERS) == set(HOOKS)


def test_scalars_of_a_record():
    step, scalars = scalars_of({"step": 4, "split": "val", "top1": 50.0, "num_samples": 8,
                                "ok": True, "note": "x"})  # fmt: skip
    assert step == 4 and scalars == {"val/top1": 50.0, "val/num_samples": 8.0}
    assert scalars_of({"step": 1, "split": "train", "loss": 2.0})[1] == {"train/loss": 2.0}


def test_flat_config_dots_the_keys():
    flat = flat_config({"optim": {"lr": 0.001, "grad_clip": None}, "data": {"scale": [0.5, 1]}})
    assert flat == {"optim.lr": "0.001", "optim.grad_clip": "None", "data.scale": "[0.5, 1]"}


def test_chosen_loggers(monkeypatch):
    assert chosen_loggers(("none",)) == []
    assert chosen_loggers(("mlflow", "wandb")) == ["mlflow", "wandb"]
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    assert chosen_loggers(None) == []  # the default: TensorBoard only when it is installed


@pytest.mark.parametrize("value", ["foo", "none,wandb"])
def test_a_bad_logger_is_a_usage_error(value, fault_shards, tmp_path, capsys):
    code = run_cf(train_argv(fault_shards, tmp_path / "run", 1, "--logger", value))
    assert code == 2
    assert "runtime.loggers takes tensorboard, mlflow, wandb or none" in capsys.readouterr().err


@pytest.mark.parametrize("logger", LOGGERS)
def test_a_missing_package_stops_before_training(logger, fault_shards, tmp_path, monkeypatch,
                                                 capsys):  # fmt: skip
    monkeypatch.setitem(sys.modules, PACKAGES[logger], None)  # import -> ImportError
    run = tmp_path / "run"
    assert run_cf(train_argv(fault_shards, run, 1, "--logger", f"{logger}")) == 1
    line = error_line(capsys.readouterr().err)
    assert f"install the {logger} extra: pip install 'clusterformer[{logger}]'" in line
    assert not run.exists()  # nothing started


# ----------------------------------------------------------------------------- read back
def test_tensorboard_event_files_hold_the_scalars(logged_run):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = logged_run
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    loss = {e.step: e.value for e in events.Scalars("train/loss")}
    assert loss == pytest.approx(_jsonl_series(run, "train", "loss"), rel=1e-6)
    top1 = {e.step: e.value for e in events.Scalars("val/top1")}
    assert top1 == pytest.approx(_jsonl_series(run, "val", "top1"), rel=1e-6)
    assert set(top1) == {2, 3}
    assert "config" in "".join(events.Tags()["tensors"])  # the config as text


def test_mlflow_file_store_holds_the_scalars_and_config(logged_run):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    run = logged_run
    client = MlflowClient(tracking_uri=(run / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("clusterformer")
    (found,) = client.search_runs([experiment.experiment_id])
    assert found.info.run_name == "run" and found.info.status == "FINISHED"
    history = client.get_metric_history(found.info.run_id, "train/loss")
    assert {m.step: m.value for m in history} == pytest.approx(_jsonl_series(run, "train", "loss"))
    top1 = client.get_metric_history(found.info.run_id, "val/top1")
    assert {m.step: m.value for m in top1} == pytest.approx(_jsonl_series(run, "val", "top1"))
    params = found.data.params
    assert float(params["optim.lr"]) == _config(run)["optim"]["lr"]
    assert params["task.name"] == _config(run)["task"]["name"]
    artifact = Path(found.info.artifact_uri.removeprefix("file://")) / "config.json"
    assert json.loads(artifact.read_text())["optim"] == _config(run)["optim"]


def _wandb_records(run_file: Path) -> list[bytes]:
    """The records of a ``.wandb`` transaction log: a 7-byte header (``:W&B``, magic,
    version), then 32 KiB blocks of chunks (crc32 u32, length u16, type u8: 1 full, 2 first,
    3 middle, 4 last), LevelDB's log format."""
    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    records, pending, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # too little room left for a header: padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:  # zero padding at the end of the file
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            records.append(pending)
    return records


def _wandb_rows(run_file: Path, kind: str) -> list[dict]:
    """The ``history`` rows (or the ``run`` record's config) of a ``.wandb`` file as dicts."""
    from wandb.proto import wandb_internal_pb2

    rows = []
    for data in _wandb_records(run_file):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == kind:
            items = record.history.item if kind == "history" else record.run.config.update
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in items})  # fmt: skip
    return rows


def test_wandb_offline_run_holds_the_scalars(logged_run):
    pytest.importorskip("wandb")
    run = logged_run
    (folder,) = (run / "wandb").glob("offline-run-*")
    run_file = next(folder.glob("run-*.wandb"))
    rows = _wandb_rows(run_file, "history")
    loss = {row["_step"]: row["train/loss"] for row in rows if "train/loss" in row}
    assert loss == pytest.approx(_jsonl_series(run, "train", "loss"))
    top1 = {row["_step"]: row["val/top1"] for row in rows if "val/top1" in row}
    assert top1 == pytest.approx(_jsonl_series(run, "val", "top1"))
    config = {k: v for row in _wandb_rows(run_file, "run") for k, v in row.items()}
    assert config["optim"]["lr"] == _config(run)["optim"]["lr"]


def test_restart_removes_the_logger_folders(tmp_path):
    from clusterformer.engine.run_folder import restart

    for name in ("tensorboard", "mlruns", "wandb"):
        (tmp_path / name / "x").mkdir(parents=True)
    (tmp_path / "keep.txt").write_text("not a log")
    notes = restart(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]
    assert "mlruns, wandb" in notes[0]
