"""benchmarks/table_s1.py: the rows and their recipe, resuming, the JSON schema, the report's
maths; and (slow) the smoke budget end to end."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import table_s1  # noqa: E402  (the benchmarks folder is not a package)
import table_s1_report as report  # noqa: E402

ROWS_PER_TABLE = {"a": 4, "b": 4, "c": 5, "d": 5, "e": 5, "f": 5}


def _args(tmp_path: Path, *extra: str):
    return table_s1.parse_args(["--budget", "smoke", "--seeds", "2", "--out", str(tmp_path), *extra])


def test_every_subtable_has_its_rows_and_one_adopted_design():
    for table, count in ROWS_PER_TABLE.items():
        rows = table_s1.rows_for(table)
        assert len(rows) == count
        assert sum(row.adopted for row in rows) == 1
    # 28 rows, 22 runs per seed: the adopted design is shared by the six sub-tables, and S1a's
    # "+ RCA" is S1e's "none" (recurrent update, no dispatching).
    keys = {row.key for row in table_s1.ROWS}
    assert len(keys) == 22
    a_rca, e_none = table_s1.rows_for("a")[1], table_s1.rows_for("e")[0]
    assert a_rca.key == e_none.key and a_rca.paper == e_none.paper


def test_a_row_changes_only_its_own_switch(tmp_path):
    """One recipe for all rows: a row's config differs from the adopted one's only in the
    switch its sub-table is about (T in b, head_dim in d, ...), and every row changes it."""
    args = _args(tmp_path)
    budget = table_s1.BUDGETS["smoke"]
    adopted = table_s1.run_spec(args, budget, table_s1.rows_for("a")[3], 0)
    switches = {"b": {"num_iters"}, "c": {"center_update"}, "d": {"head_dim"},
                "e": {"dispatching"}, "f": {"query_init"}}
    for row in table_s1.ROWS:
        spec = table_s1.run_spec(args, budget, row, 0)
        changed = {k for k, v in spec["overrides"].items() if adopted["overrides"].get(k) != v}
        assert spec["recipe"] == adopted["recipe"]
        assert {k: v for k, v in spec["flags"].items() if k != "out"} == \
            {k: v for k, v in adopted["flags"].items() if k != "out"}
        if row.adopted:
            assert not changed
        elif row.table in switches:
            assert changed and {k.split(".")[-1] for k in changed} == switches[row.table]
        else:
            assert changed <= {f"model.{part}.{name}" for part in ("backbone", "decoder")
                               for name in ("center_update", "num_iters", "dispatching")}


def test_every_row_resolves_to_a_valid_config(tmp_path):
    from clusterformer.engine.config_files import resolve_config

    args = _args(tmp_path)
    for row in table_s1.ROWS:
        spec = table_s1.run_spec(args, table_s1.BUDGETS["smoke"], row, 1)
        cfg = resolve_config(spec["recipe"], overrides=spec["overrides"], **spec["flags"])
        assert cfg.runtime.seed == 1 and cfg.task.name == "panoptic"
        for key, value in spec["overrides"].items():
            if not key.startswith("model."):
                continue
            node = cfg
            for part in key.split("."):
                node = getattr(node, part)
            assert node == value, key


def _fake_result(folder: Path, row, seed: int, pq: float) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    record = {"table": row.table, "variant": row.variant, "key": row.key, "seed": seed,
              "PQ": pq, "PQ_th": pq + 1, "PQ_st": pq - 1, "SQ": 70.0, "RQ": 20.0,
              "train_img_per_s": 10.0, "peak_rss_mib": 500.0, "wall_s": 1.0}
    (folder / "result.json").write_text(json.dumps(record))


def test_resume_trains_only_unfinished_runs_and_the_adopted_design_once(tmp_path, monkeypatch):
    args = _args(tmp_path)
    (tmp_path / "data" / "shards-train").mkdir(parents=True)
    for split in ("train", "val"):  # data present: nothing to make
        (tmp_path / "data" / f"shards-{split}").mkdir(parents=True, exist_ok=True)
        (tmp_path / "data" / f"shards-{split}" / "dataset.json").write_text("{}")
    trained = []

    def fake_run(spec, timeout):
        folder = Path(spec["flags"]["out"])
        trained.append(folder.name)
        assert (folder / "claim").read_text() == str(os.getpid())  # held while it trains
        row = next(r for r in table_s1.ROWS if r.key == spec["row"]["key"])
        _fake_result(folder, row, spec["flags"]["seed"], 10.0)
        (folder / "spec.json").write_text(json.dumps(spec))
        return {"PQ": 10.0, "wall_s": 1.0}

    monkeypatch.setattr(table_s1, "run_one", fake_run)
    assert table_s1.run_all(args) == 0
    assert len(trained) == len(set(trained)) == 2 * 22
    assert trained[0] == "adopted-s0" and trained[22] == "adopted-s1"  # the reference first
    assert not list(tmp_path.glob("runs/*/claim"))  # claims released
    trained.clear()
    assert table_s1.run_all(args) == 0
    assert trained == []  # everything finished: nothing reruns
    (tmp_path / "runs" / "c-k_means-s1" / "result.json").unlink()
    table_s1.run_all(args)
    assert trained == ["c-k_means-s1"]
    # A run another live process has claimed is left to it; a dead process's claim is taken.
    trained.clear()
    for name, owner in (("c-k_means-s1", os.getppid()), ("d-head_dim_16-s0", 2**22 + 7)):
        (tmp_path / "runs" / name / "result.json").unlink()
        (tmp_path / "runs" / name / "claim").write_text(str(owner))
    table_s1.run_all(args)
    assert trained == ["d-head_dim_16-s0"]
    # Each sub-table names the shared adopted run its own way; the name is not a setting.
    trained.clear()
    assert table_s1.run_all(_args(tmp_path, "--tables", "b")) == 0
    assert trained == []
    # A finished run made with other settings stops the command: one OUT, one experiment.
    with pytest.raises(SystemExit, match="other settings"):
        table_s1.run_all(_args(tmp_path, "--steps", "7"))


def _data(out: Path) -> None:
    for split in ("train", "val"):  # data present: nothing to make
        (out / "data" / f"shards-{split}").mkdir(parents=True, exist_ok=True)
        (out / "data" / f"shards-{split}" / "dataset.json").write_text("{}")


def test_the_archive_keeps_finished_runs_for_a_fresh_out(tmp_path, monkeypatch):
    first, second, archive = tmp_path / "machine-1", tmp_path / "machine-2", tmp_path / "archive"
    _data(first)
    _data(second)
    trained, killed = [], {"adopted-s1"}

    def fake_run(spec, timeout):
        folder = Path(spec["flags"]["out"])
        trained.append(folder.name)
        if folder.name in killed:
            raise RuntimeError("killed")  # unfinished: nothing of it may reach the archive
        row = next(r for r in table_s1.ROWS if r.key == spec["row"]["key"])
        _fake_result(folder, row, spec["flags"]["seed"], 10.0)
        (folder / "spec.json").write_text(json.dumps(spec))
        (folder / "last.pt").write_bytes(b"weights")  # a checkpoint: never archived
        return {"PQ": 10.0, "wall_s": 1.0}

    monkeypatch.setattr(table_s1, "run_one", fake_run)
    assert table_s1.run_all(_args(first, "--archive", str(archive))) == 1
    archived = {path.parent.name for path in archive.glob("runs/*/result.json")}
    assert len(archived) == 2 * 22 - 1 and "adopted-s1" not in archived
    assert not list(archive.glob("runs/*/last.pt"))
    assert not (archive / "runs" / "adopted-s1").exists()
    # Another machine, another OUT: the archived runs come back and only the missing one trains,
    # though their spec.json name the first machine's paths.
    trained.clear()
    killed.clear()
    assert table_s1.run_all(_args(second, "--archive", str(archive))) == 0
    assert trained == ["adopted-s1"]
    assert (archive / "runs" / "adopted-s1" / "result.json").exists()
    assert (second / "runs" / "c-k_means-s1" / "result.json").exists()
    # Settings are still checked across machines: one archive, one experiment.
    with pytest.raises(SystemExit, match="other settings"):
        table_s1.run_all(_args(second, "--archive", str(archive), "--steps", "7"))
    # The report from the archive alone.
    table = table_s1.write_table(_args(archive))
    assert len(json.loads(table.read_text())["rows"]) == 2 * sum(ROWS_PER_TABLE.values())
    # --report-only with --archive: runs finished without it are archived, both get a report,
    # and so do the side-by-side costs (table_s1_cost.py writes them into OUT).
    (archive / "runs" / "c-k_means-s1" / "result.json").unlink()
    (second / "cost.json").write_text('{"rows": []}')
    assert table_s1.main(["--budget", "smoke", "--seeds", "2", "--out", str(second),
                          "--archive", str(archive), "--report-only"]) == 0
    assert (archive / "runs" / "c-k_means-s1" / "result.json").exists()
    assert (archive / "report.md").exists() and (second / "report.md").exists()
    assert json.loads((archive / "cost.json").read_text()) == {"rows": []}


def test_a_killed_run_continues_from_its_checkpoint_and_a_fresh_one_starts_clean(tmp_path):
    # The two cases a killed harness leaves: a run folder without a checkpoint (stale logs are
    # cleared, training starts at step 0) and one with a checkpoint (training continues there).
    args = _args(tmp_path)
    budget = table_s1.BUDGETS["smoke"]
    table_s1.make_scenes(tmp_path, *budget.scenes, budget.scene_options)
    adopted = next(r for r in table_s1.ROWS if r.adopted)
    spec = table_s1.run_spec(args, budget, adopted, 0)
    spec["flags"]["steps"] = spec["flags"]["eval_every"] = 2
    spec["overrides"]["runtime.save_every"] = 1
    folder = Path(spec["flags"]["out"])
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text('{"step": 999, "split": "train"}\n')
    assert table_s1.run_one(spec, timeout=600)["step"] == 2
    steps = [json.loads(line)["step"] for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert 999 not in steps and steps[0] == 1
    spec["flags"]["steps"] = spec["flags"]["eval_every"] = 3
    assert table_s1.run_one(spec, timeout=600)["step"] == 3
    assert "at step 2" in (folder / "child.log").read_text()


def test_table_json_schema(tmp_path):
    args = _args(tmp_path)
    for seed in range(2):
        for row in table_s1.ROWS:
            _fake_result(table_s1.run_dir(tmp_path, row, seed), row, seed, 10.0 + seed)
    data = json.loads(table_s1.write_table(args).read_text())
    rows = data["rows"]
    assert len(rows) == 2 * sum(ROWS_PER_TABLE.values())
    for row in rows:
        assert row["table"] in "abcdef" and isinstance(row["variant"], str)
        assert isinstance(row["seed"], int)
        assert all(isinstance(row[k], float) for k in ("PQ", "PQ_th", "PQ_st"))
    for table, count in ROWS_PER_TABLE.items():
        assert len({r["variant"] for r in rows if r["table"] == table}) == count


def test_paired_test_matches_the_textbook_paired_t():
    variant = {0: 12.0, 1: 15.0, 2: 11.0, 3: 14.5}
    adopted = {0: 10.0, 1: 14.0, 2: 10.5, 3: 12.0}
    diffs = [2.0, 1.0, 0.5, 2.5]
    mean = sum(diffs) / 4
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 3)
    got = report.paired_test(variant, adopted)
    assert got["n"] == 4 and got["diff"] == pytest.approx(mean)
    assert got["t"] == pytest.approx(mean / (sd / 2))
    from scipy import stats

    assert got["p"] == pytest.approx(stats.ttest_rel(list(variant.values()),
                                                     list(adopted.values())).pvalue)
    # Only the seeds both have are paired; one pair cannot be tested.
    assert report.paired_test({0: 1.0, 5: 3.0}, {0: 0.5})["p"] is None
    assert report.paired_test({}, {0: 1.0})["diff"] is None


def test_holm_adjusts_within_the_family_and_keeps_the_order():
    # m = 4 tested values (None is not a test): 0.01 x 4, 0.02 x 3, 0.03 x 2 -> running max, 0.5 x 1.
    adjusted = report.holm([0.03, None, 0.01, 0.5, 0.02])
    assert adjusted[1] is None
    assert adjusted[2] == pytest.approx(0.04) and adjusted[4] == pytest.approx(0.06)
    assert adjusted[0] == pytest.approx(0.06) and adjusted[3] == pytest.approx(0.5)
    assert report.holm([0.4, 0.6]) == [pytest.approx(0.8), pytest.approx(0.8)]  # capped, monotone
    assert report.holm([]) == []


def test_a_difference_is_significant_only_after_holm():
    # Five variants each about 1 PQ above the adopted design on three seeds, every raw p near
    # 0.015: alone each would be "significant", as a family of five none is (Holm: x5 ... x1).
    # A variant whose differences are nearly equal (raw p 3e-5) stays significant among them.
    def family(spreads):
        rows = [{"table": "c", "variant": "ours", "adopted": True, "seed": s, "PQ": 40.0 + s,
                 "PQ_th": 10.0, "PQ_st": 90.0} for s in range(3)]
        rows += [{"table": "c", "variant": f"v{i}", "seed": s, "PQ": 40.0 + s + (1.0, 1.0 + e, 1.0 - e)[s],
                  "PQ_th": 10.0, "PQ_st": 90.0} for i, e in enumerate(spreads) for s in range(3)]
        return [line["vs_adopted"] for line in report.summarise(rows)["c"] if line["vs_adopted"]]

    noisy = family([0.2, 0.201, 0.202, 0.203, 0.204])
    assert all(t["p"] < 0.05 <= t["p_holm"] for t in noisy)
    assert all("within noise" in report._verdict(t) and "(Holm " in report._verdict(t) for t in noisy)
    mixed = family([0.01, 0.201, 0.202, 0.203, 0.204])
    assert mixed[0]["p_holm"] < 0.05 and "significant" in report._verdict(mixed[0])
    assert all(t["p_holm"] >= 0.05 for t in mixed[1:])


def test_named_things_counts_the_seeds_at_or_above_the_threshold():
    # Seeds whose things were recognised (PQ_th >= NAMED_PQ_TH) are counted per row; the mean
    # PQ_th of this row (8.0) would hide that one seed of three reached it and two did not.
    th = report.NAMED_PQ_TH
    rows = [{"table": "f", "variant": "ours", "adopted": True, "seed": s, "PQ": 50.0,
             "PQ_th": 20.0, "PQ_st": 95.0, "paper_PQ": 54.0} for s in range(3)]
    rows += [{"table": "f", "variant": "v", "seed": s, "PQ": 45.0, "PQ_th": pq_th, "PQ_st": 95.0,
              "paper_PQ": 53.0}
             for s, pq_th in enumerate((th - 0.1, th, 0.0))]
    lines = report.summarise(rows)["f"]
    assert [line["named"] for line in lines] == [3, 1]
    text = report.markdown({"f": lines})
    assert "| **ours** | 3 |" in text and "| 3/3 |" in text and "| 1/3 |" in text


def test_the_plot_shows_paired_differences_beside_the_papers():
    # The plot's data: seed-by-seed differences against the adopted design over the seeds both
    # have (seed 2 of the variant has no adopted partner), and the paper's difference.
    rows = [{"table": "b", "variant": "T=3", "adopted": True, "seed": s, "PQ": pq, "PQ_th": 10.0,
             "PQ_st": 90.0, "paper_PQ": 54.7} for s, pq in ((0, 40.0), (1, 50.0))]
    rows += [{"table": "b", "variant": "T=1", "seed": s, "PQ": pq, "PQ_th": 10.0, "PQ_st": 90.0,
              "paper_PQ": 53.3} for s, pq in ((0, 45.0), (1, 49.0), (2, 70.0))]
    (line,) = report.paired_differences(report.summarise(rows)["b"])
    assert line["variant"] == "T=1" and line["diffs"] == [5.0, -1.0]
    assert line["mean"] == pytest.approx(2.0) and line["paper"] == pytest.approx(-1.4)
    assert line["significant"] is False
    assert report.paired_differences([]) == []


def test_kendall_tau_and_mean_std():
    assert report.kendall_tau([1, 2, 3], [10, 20, 30]) == 1.0
    assert report.kendall_tau([3, 2, 1], [10, 20, 30]) == -1.0
    assert report.kendall_tau([1, 3, 2], [10, 20, 30]) == pytest.approx(1 / 3)
    assert report.mean_std([2.0, 4.0]) == (3.0, pytest.approx(math.sqrt(2)))
    assert report.mean_std([5.0]) == (5.0, 0.0)


def test_speed_ratio_is_the_median_per_seed_ratio():
    rows = [{"table": "b", "variant": "T=3", "adopted": True, "seed": s, "train_img_per_s": v}
            for s, v in ((0, 10.0), (1, 20.0), (2, 30.0))]
    rows += [{"table": "b", "variant": "T=1", "adopted": False, "seed": s, "train_img_per_s": v}
             for s, v in ((0, 11.0), (1, 30.0), (2, 36.0))]
    assert report.speed_ratio(rows, "b", "T=1") == pytest.approx(1.2)  # median of 1.1, 1.5, 1.2
    assert report.speed_ratio(rows, "b", "T=2") is None


def test_report_writes_markdown_and_png(tmp_path):
    args = _args(tmp_path)
    for seed in range(2):
        for i, row in enumerate(table_s1.ROWS):
            _fake_result(table_s1.run_dir(tmp_path, row, seed), row, seed, 20.0 + i + seed)
    written = report.write_report(table_s1.write_table(args), tmp_path)
    text = written.read_text()
    for title in report.TITLES.values():
        assert title in text
    assert "significant" in text or "within noise" in text
    assert "T = 3 against T = 1" in text
    # Each seed shown, in seed order. The adopted design's one run per seed was written last
    # as the last row (27) of ROWS: PQ 20 + 27 + seed, PQ_th one more.
    assert "| **ClusterFormer (both)** | 2 | 47.0 (48.0) / 48.0 (49.0) |" in text
    assert (tmp_path / "table_s1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cost_configurations_are_the_runs_and_the_report_shows_their_ratio(tmp_path):
    import table_s1_cost

    args = table_s1_cost.parse_args(["--budget", "cpu", "--out", str(tmp_path)])
    configs = table_s1_cost.configurations(args)
    run_keys = {table_s1.run_dir(tmp_path, row, 0).name.removesuffix("-s0") for row in table_s1.ROWS}
    assert [key for key, _ in configs][0] == "adopted" and len(configs) == len(run_keys) == 22
    assert {key for key, _ in configs} == run_keys
    assert all(spec["flags"]["seed"] == 0 for _, spec in configs)
    # The report: each row's cost ratio from cost.json, and T = 3 against T = 1 from it.
    for i, row in enumerate(table_s1.ROWS):
        _fake_result(table_s1.run_dir(tmp_path, row, 0), row, 0, 20.0 + i)
    t1 = next(r for r in table_s1.ROWS if r.table == "b" and r.variant == "T=1")
    costs = [{"key": key, "time_x_adopted": 0.8 if key == t1.key else 1.0} for key, _ in configs]
    (tmp_path / "cost.json").write_text(json.dumps({"rows": costs}))
    text = report.write_report(table_s1.write_table(_args(tmp_path)), tmp_path).read_text()
    assert "| 0.800 |" in text and "| 1.000 |" in text
    assert "timed side by side (`table_s1_cost.py`): x1.250 (+25.0 %)" in text


def test_cost_times_every_configuration_every_round_from_cf_trains_setup(tmp_path, monkeypatch):
    import table_s1_cost

    from clusterformer.engine.step import train_step as real_step

    args = table_s1_cost.parse_args(["--budget", "smoke", "--out", str(tmp_path), "--rounds", "3",
                                     "--warmup", "1", "--batches", "1"])  # fmt: skip
    two = table_s1_cost.configurations(args)[:2]  # adopted and one other: the loop, not 22 builds
    monkeypatch.setattr(table_s1_cost, "configurations", lambda _: two)
    calls = []

    def counting_step(state, task, batches):
        calls.append(state.model.__class__.__name__)
        return real_step(state, task, batches)

    monkeypatch.setattr("clusterformer.engine.step.train_step", counting_step)
    doc = table_s1_cost.measure(args)
    assert len(calls) == 2 * (1 + 3)  # each configuration once per round, warm-up included
    assert [row["key"] for row in doc["rows"]] == [key for key, _ in two]
    assert doc["rows"][0]["time_x_adopted"] == 1.0
    assert all(row["step_ms"] > 0 and row["img_per_s"] > 0 for row in doc["rows"])
    assert not list(tmp_path.glob("runs/*"))  # built in a scratch folder, not the experiment's


def test_bad_arguments_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        table_s1.parse_args(["--budget", "gpu", "--seeds", "1", "--out", str(tmp_path)])
    assert exc.value.code == 2 and "--data" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        table_s1.parse_args(["--budget", "cpu", "--seeds", "1", "--out", str(tmp_path),
                             "--data", str(tmp_path)])
    assert exc.value.code == 2 and "dataset.json" in capsys.readouterr().err


@pytest.mark.slow  # every row, two seeds: ~5 minutes on 2 cores (docs/benchmarks.md, Table S1)
def test_smoke_budget_runs_every_row(tmp_path):
    code = table_s1.main(["--budget", "smoke", "--seeds", "2", "--out", str(tmp_path),
                          "--timeout", "600"])
    assert code == 0
    data = json.loads((tmp_path / "table_s1.json").read_text())
    assert len(data["rows"]) == 2 * sum(ROWS_PER_TABLE.values())
    for row in data["rows"]:
        assert all(math.isfinite(row[k]) for k in ("PQ", "PQ_th", "PQ_st", "SQ", "RQ"))
        assert row["train_img_per_s"] > 0 and row["peak_rss_mib"] > 0
        config = json.loads((table_s1.run_dir(tmp_path, next(
            r for r in table_s1.ROWS if r.table == row["table"] and r.variant == row["variant"]),
            row["seed"]) / "config.json").read_text())
        assert config["runtime"]["seed"] == row["seed"]
    assert (tmp_path / "report.md").exists() and (tmp_path / "table_s1.png").exists()


def test_an_out_is_one_experiment_on_one_code(tmp_path):
    fingerprint = table_s1.code_fingerprint()
    assert len(fingerprint) == 64 and fingerprint == table_s1.code_fingerprint()
    table_s1.check_same_code(tmp_path, fingerprint)  # the first command writes code.json
    assert json.loads((tmp_path / "code.json").read_text())["sha256"] == fingerprint
    table_s1.check_same_code(tmp_path, fingerprint)
    with pytest.raises(SystemExit, match="other clusterformer sources"):
        table_s1.check_same_code(tmp_path, "0" * 64)
    # The harness checks both its OUT and its archive before it trains or archives anything.
    archive = tmp_path / "archive"
    archive.mkdir()
    (archive / "code.json").write_text(json.dumps({"sha256": "1" * 64, "version": "0.1"}))
    with pytest.raises(SystemExit, match="other clusterformer sources"):
        table_s1.main(["--budget", "smoke", "--out", str(tmp_path / "out"), "--archive",
                       str(archive), "--report-only"])
