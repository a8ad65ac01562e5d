"""``cf plot`` (training curves from metrics.jsonl) and ``cf eval --plots`` (confusion matrix,
per-class bars): what is drawn from which numbers, the PNGs, and the missing-extra line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_runner import run_cf, train_argv

from clusterformer.cli.plot_cmd import curves_of, panel_order, run_labels
from clusterformer.cli.plots import per_class_groups, write_eval_plots
from clusterformer.tasks import task_spec

INSTALL_LINE = "install the plot extra: pip install 'clusterformer[plot]'"


def _png_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as image:
        assert image.format == "PNG"
        image.load()  # decodes the whole file: a truncated PNG fails here
        return image.size


def _write_run(folder: Path, losses: list[float], val_top1: float) -> Path:
    folder.mkdir(parents=True)
    lines = [{"step": s + 1, "split": "train", "loss": loss, "loss_ce": loss / 2,
              "lr": 1e-3 / (s + 1), "epoch": 0} for s, loss in enumerate(losses)]  # fmt: skip
    lines.append({"step": len(losses), "split": "val", "top1": val_top1, "num_samples": 8})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return folder


# ----------------------------------------------------------------------------- pure parts
def test_curves_split_train_and_val_and_drop_bookkeeping():
    records = [
        {"step": 1, "split": "train", "loss": 2.0, "lr": 0.1, "epoch": 0, "img_per_s": 5.0},
        {"step": 2, "split": "train", "loss": "nan", "lr": 0.05, "epoch": 0},
        {"step": 2, "split": "val", "mIoU": 12.5, "num_images": 4.0, "IoU/sky": 40.0},
        {"step": 2, "split": "train", "loss": 1.5, "lr": 0.05, "epoch": 1},  # resumed: newest
    ]
    curves = curves_of(records)
    assert set(curves) == {"loss", "lr", "img_per_s", "val/mIoU"}
    assert curves["loss"] == ([1, 2], [2.0, 1.5])
    assert curves["val/mIoU"] == ([2], [12.5])


def test_nan_strings_become_nan_points():
    curves = curves_of([{"step": 3, "split": "train", "loss": "nan", "grad_norm": "inf"}])
    assert np.isnan(curves["loss"][1][0]) and curves["grad_norm"][1] == [float("inf")]


def test_panel_order_loss_terms_lr_then_val():
    panels = ["val/top1", "img_per_s", "lr", "loss_mask", "loss", "loss_ce"]
    assert panel_order(panels) == ["loss", "loss_ce", "loss_mask", "lr", "img_per_s", "val/top1"]


def test_run_labels_use_the_path_when_names_clash(tmp_path):
    runs = [tmp_path / "a" / "run", tmp_path / "b" / "run", tmp_path / "c"]
    assert run_labels(runs) == [str(runs[0]), str(runs[1]), "c"]


def test_per_class_groups_read_flat_and_nested_keys():
    metrics = {"mIoU": 50.0, "IoU/sky": 80.0, "IoU/sea": 7.0, "IoU/water": -1.0,
               "AP": {"cat": 12.0, "dog": 3.0, "eel": 1.0}, "num_images": 4.0}  # fmt: skip
    assert per_class_groups(metrics) == {"IoU": {"sky": 80.0, "sea": 7.0},
                                         "AP": {"cat": 12.0, "dog": 3.0, "eel": 1.0}}  # fmt: skip


def test_class_names_with_a_slash_stay_whole():
    groups = per_class_groups({"IoU/wall/brick": 5.0, "per_class": {"AP": {"a/b": 1.0, "c": 2.0}}})
    assert groups == {"IoU": {"wall/brick": 5.0}, "AP": {"a/b": 1.0, "c": 2.0}}


@pytest.mark.parametrize("per_class", [
    {"AP": {"cat": 100.0, "dog": 50.0, "eel": 0.0}, "AP50": {"cat": 100.0, "dog": 60.0}},
    {"AP/cat": 100.0, "AP/dog": 50.0, "AP/eel": 0.0, "AP50/cat": 100.0, "AP50/dog": 60.0},
    {"cat": {"AP": 100.0, "AP50": 100.0}, "dog": {"AP": 50.0, "AP50": 60.0}, "eel": {"AP": 0.0}},
    [{"name": "cat", "AP": 100.0, "AP50": 100.0}, {"name": "dog", "AP": 50.0, "AP50": 60.0},
     {"name": "eel", "AP": 0.0}],
])
def test_per_class_groups_read_any_nesting_under_per_class(per_class):
    groups = per_class_groups({"bbox_AP": 50.0, "per_class": per_class})
    assert groups == {"AP": {"cat": 100.0, "dog": 50.0, "eel": 0.0},
                      "AP50": {"cat": 100.0, "dog": 60.0}}  # fmt: skip


def test_class_evaluator_counts_true_and_top1_pairs():
    task = task_spec("classification").build(3)
    evaluator = task.evaluator()
    scores = torch.tensor([[9.0, 0, 0], [0, 9.0, 0], [0, 9.0, 0], [0, 0, 9.0], [9.0, 0, 0]])
    labels = torch.tensor([0, 1, 2, 2, 1])
    evaluator.update(scores, {"labels": labels, "valid": [True] * 4 + [False]})
    matrix, names = evaluator.confusion_matrix()
    assert names == ["0", "1", "2"]
    assert matrix.tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]  # the padded sample left out
    assert evaluator.per_class_metrics() == {"Acc/0": 100.0, "Acc/1": 100.0, "Acc/2": 50.0}
    assert evaluator.compute()["top1"] == 75.0


def _semantic_evaluator():
    categories = [{"id": i + 1, "name": n, "train_id": i} for i, n in enumerate(("sky", "sea", "x"))]
    evaluator = task_spec("semantic").build(categories).evaluator()
    gt = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]])
    evaluator.update([pred], {"targets": [{"semantic": gt, "orig_size": (2, 4), "key": "a"}]})
    return evaluator


def test_semantic_evaluator_exposes_its_confusion_matrix_and_iou():
    evaluator = _semantic_evaluator()
    matrix, names = evaluator.confusion_matrix()
    assert names == ["sky", "sea", "x"]
    assert matrix.tolist() == [[3, 1, 0], [0, 3, 0], [0, 0, 0]]  # the ignored pixel left out
    # sky: 3 / (4 + 3 - 3); sea: 3 / (3 + 4 - 3); x absent from both: no value
    assert evaluator.per_class_metrics() == {"IoU/sky": 75.0, "IoU/sea": 75.0}


def test_panoptic_evaluator_per_class_pq_of_present_classes():
    categories = [{"id": 1, "name": "a", "isthing": 1}, {"id": 2, "name": "b", "isthing": 0}]
    evaluator = task_spec("panoptic").build(categories).evaluator()
    evaluator.stats[0] = (0.8, 1, 0, 1)  # iou sum, tp, fp, fn
    assert evaluator.per_class_metrics() == pytest.approx({"PQ/a": 100 * 0.8 / 1.5})


# ----------------------------------------------------------------------------- PNGs
def test_eval_plots_write_confusion_and_bars(tmp_path):
    pytest.importorskip("matplotlib")
    written = write_eval_plots(tmp_path / "plots", "", {"mIoU": 75.0}, _semantic_evaluator())
    assert [p.name for p in written] == ["confusion_matrix.png", "confused_pairs.png",
                                         "per_class_IoU.png"]  # fmt: skip
    for path in written:
        width, height = _png_size(path)
        assert 200 < width < 4500 and 100 < height < 4500


def test_a_150_class_confusion_matrix_stays_a_readable_size(tmp_path):
    pytest.importorskip("matplotlib")
    from clusterformer.cli.plots import draw_confusion

    counts = np.random.default_rng(0).integers(0, 50, (150, 150))
    path = draw_confusion(counts, [f"class {i}" for i in range(150)], tmp_path / "c.png", "t")
    width, height = _png_size(path)
    assert 1200 < width < 2600 and 1200 < height < 2600  # 0.12 in a class, names included


def test_eval_plots_of_an_evaluator_without_either_write_nothing(tmp_path):
    pytest.importorskip("matplotlib")
    assert write_eval_plots(tmp_path, "", {"PQ": 3.0}, object()) == []
    assert list(tmp_path.iterdir()) == []


def test_cf_plot_overlays_runs_in_one_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    a = _write_run(tmp_path / "a", [2.0, 1.5, 1.0], 40.0)
    b = _write_run(tmp_path / "b", [2.5, 2.0, 1.8, 1.7], 30.0)
    assert run_cf(["plot", str(a), str(b / "metrics.jsonl"), "--out", str(tmp_path / "c.png")]) == 0
    width, height = _png_size(tmp_path / "c.png")
    assert width > 800 and height > 300  # 3 columns of panels, 2 rows
    assert "wrote" in capsys.readouterr().out


def test_cf_plot_to_a_folder_writes_one_png_per_curve(tmp_path):
    pytest.importorskip("matplotlib")
    run = _write_run(tmp_path / "run", [2.0, 1.0], 50.0)
    assert run_cf(["plot", str(run), "--out", str(tmp_path / "figs")]) == 0
    names = sorted(p.name for p in (tmp_path / "figs").iterdir())
    assert names == ["curves.png", "loss.png", "loss_ce.png", "lr.png", "val_top1.png"]
    assert all(_png_size(tmp_path / "figs" / n)[0] > 300 for n in names)


def test_cf_plot_names_a_bad_line(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    run = _write_run(tmp_path / "run", [2.0], 50.0)
    with (run / "metrics.jsonl").open("a") as f:
        f.write("{not json\n")
    assert run_cf(["plot", str(run), "--out", str(tmp_path / "x.png")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("cf: error:") and "metrics.jsonl:3: not a JSON line" in err
    assert not (tmp_path / "x.png").exists()


def test_a_line_being_written_is_left_out(tmp_path):
    from clusterformer.cli.plot_cmd import read_records

    run = _write_run(tmp_path / "run", [2.0, 1.0], 50.0)
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "split": "tra')  # a run in progress, mid-write
    assert [r["step"] for r in read_records(run / "metrics.jsonl")] == [1, 2, 2]


def test_cf_plot_without_a_run_folder(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert run_cf(["plot", str(tmp_path), "--out", str(tmp_path / "x.png")]) == 1
    assert "no metrics.jsonl" in capsys.readouterr().err


def test_without_matplotlib_one_line_names_the_extra(tmp_path, monkeypatch, capsys):
    run = _write_run(tmp_path / "run", [2.0], 50.0)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert run_cf(["plot", str(run), "--out", str(tmp_path / "x.png")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and INSTALL_LINE in err[0]
    data = tmp_path / "no-data"
    data.mkdir()
    assert run_cf(["eval", "--ckpt", str(run), "--data", str(data), "--plots"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and INSTALL_LINE in err[0]


# ----------------------------------------------------------------------------- a real run
@pytest.fixture(scope="module")
def small_run(fault_shards, tmp_path_factory):  # noqa: ANN001, ANN201
    run = tmp_path_factory.mktemp("plots") / "run"
    argv = train_argv(fault_shards, run, 3, "--val-data", str(fault_shards), "--eval-every", "2",
                      "--log-every", "1")  # fmt: skip
    assert run_cf(argv) == 0
    return run


def test_cf_plot_of_a_trained_run(small_run, tmp_path):
    pytest.importorskip("matplotlib")
    assert run_cf(["plot", str(small_run), "--out", str(tmp_path / "figs")]) == 0
    names = {p.name for p in (tmp_path / "figs").iterdir()}
    assert {"curves.png", "loss.png", "lr.png", "val_top1.png"} <= names


def test_cf_eval_plots_of_a_checkpoint(small_run, fault_shards, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "plots"
    assert run_cf(["eval", "--ckpt", str(small_run), "--data", str(fault_shards),
                   "--plots-dir", str(out)]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "wrote 3 plot(s)" in printed
    assert printed.index("top1") < printed.index("wrote 3 plot(s)")  # the table, then where the plots are
    assert sorted(p.name for p in out.iterdir()) == ["confused_pairs.png", "confusion_matrix.png",
                                                     "per_class_Acc.png"]  # fmt: skip
    for path in out.iterdir():
        width, height = _png_size(path)
        assert width > 300 and height > 150


def test_cf_eval_plots_go_next_to_out(small_run, fault_shards, tmp_path):
    pytest.importorskip("matplotlib")
    assert run_cf(["eval", "--ckpt", str(small_run), "--data", str(fault_shards), "--plots",
                   "--out", str(tmp_path / "m.json")]) == 0  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "m.confused_pairs.png", "m.confusion_matrix.png", "m.json", "m.per_class_Acc.png"]
    matrix = json.loads((tmp_path / "m.json").read_text())
    assert matrix["num_samples"] == 16


def test_plots_target():
    pytest.importorskip("matplotlib")
    from clusterformer.cli.plots import plots_target

    assert plots_target(False, None, Path("r/m.json")) is None
    assert plots_target(True, None, Path("r/m.json")) == (Path("r"), "m.")
    assert plots_target(True, None, None) == (Path("plots"), "")
    assert plots_target(False, Path("d"), Path("r/m.json")) == (Path("d"), "")
