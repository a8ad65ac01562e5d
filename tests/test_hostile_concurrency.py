"""One writer per output (issue 21): two commands on one folder, as real processes.

A child process holds an output's lock (as a running command does) and says so on stdout;
the second command must be refused at once with one line naming the folder and the holder's
pid, leaving what is there untouched. The waits are event-driven (a line on a pipe, a file
appearing); their timeouts are only safety nets."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_runner import CF_MODULE, run_cf_child, train_argv
from fault_kit import cf, error_line, snapshot

from clusterformer.data.output_lock import OutputInUse, hold_output, lock_path

pytestmark = pytest.mark.skipif(os.name == "nt", reason="outputs are not locked on Windows")

HOLDER = """
import sys
from clusterformer.data.output_lock import hold_output
with hold_output(sys.argv[1], "cf test-holder", is_file=sys.argv[2] == "file"):
    print("locked", flush=True)
    sys.stdin.read()  # until the test closes the pipe
"""


class Holder:
    """A child process holding ``output``'s lock until :meth:`release`."""

    def __init__(self, output: Path, is_file: bool = False) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(output),
                                      "file" if is_file else "folder"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
        assert self.proc.stdout.readline().strip() == "locked"

    def release(self) -> None:
        self.proc.stdin.close()
        assert self.proc.wait(timeout=600) == 0


def _in_use(line: str, output: Path, pid: int) -> None:
    assert str(output) in line and "in use by another cf command" in line, line
    assert f"pid {pid}" in line and "cf test-holder" in line, line


def test_a_second_holder_is_refused_and_a_dead_one_frees_the_output(tmp_path):
    holder = Holder(tmp_path / "out")
    with pytest.raises(OutputInUse) as caught:
        with hold_output(tmp_path / "out", "cf second"):
            pass
    _in_use(str(caught.value), tmp_path / "out", holder.proc.pid)
    holder.proc.kill()  # killed, not released: the kernel frees the lock
    holder.proc.wait(timeout=600)
    with hold_output(tmp_path / "out", "cf third"):
        with hold_output(tmp_path / "out", "cf third, nested"):  # the same process may nest
            pass
        assert lock_path(tmp_path / "out").exists()
    assert not lock_path(tmp_path / "out").exists()  # no lock file left behind


def test_shard_dataset_into_a_folder_in_use_leaves_the_dataset(fault_raw, tmp_path, capsys):
    out = tmp_path / "shards"
    args = ["shard-dataset", "--format", "imagefolder", "--images", fault_raw / "classes",
            "--samples-per-shard", "4"]  # fmt: skip
    assert cf([*args, "--out", out], capsys)[0] == 0
    before = snapshot(out)
    holder = Holder(out)
    try:
        code, err = cf([*args, "--out", out, "--samples-per-shard", "3"], capsys)
        assert code == 1
        _in_use(error_line(err), out, holder.proc.pid)
        assert {k: v for k, v in snapshot(out).items() if k != ".cf-lock"} == before
    finally:
        holder.release()
    assert cf([*args, "--out", out, "--samples-per-shard", "3"], capsys)[0] == 0


def test_two_shard_dataset_runs_at_once_leave_one_whole_dataset(fault_raw, tmp_path):
    """Whichever order the two real commands take, the folder ends with one complete dataset
    and no temporaries; a refused run says so and fails (never a false success)."""
    out = tmp_path / "shards"
    base = [sys.executable, *CF_MODULE, "shard-dataset", "--format", "imagefolder", "--images",
            str(fault_raw / "classes"), "--out", str(out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([*base, "--samples-per-shard", str(n)], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for n in (3, 5)]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    for code, err in results:
        assert code == 0 or (code == 1 and "in use by another cf command" in err), err
    info = json.loads((out / "dataset.json").read_text())
    assert sorted(p.name for p in out.glob("shard-*.tar")) == sorted(s["name"] for s in info["shards"])
    assert info["num_samples"] == 16 and not list(out.glob(".*"))


def test_train_on_a_run_folder_in_use_is_refused(fault_shards, fault_warm, tmp_path, capsys):
    """A real `cf train` holds its run folder; a second one on it writes nothing."""
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, *CF_MODULE, *train_argv(fault_shards, run, 100_000)],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 600  # a safety net: config.yaml comes within seconds
        while not (run / "metrics.jsonl").exists():
            assert first.poll() is None, first.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        config = (run / "config.yaml").read_bytes()
        code, err = cf(train_argv(fault_shards, run, 3, "--lr", "0.5"), capsys)
        line = error_line(err)
        assert code == 1 and str(run) in line and f"pid {first.pid}" in line, line
        assert "cf train" in line and (run / "config.yaml").read_bytes() == config
    finally:
        first.send_signal(signal.SIGTERM)  # saves a checkpoint, then exits 128 + 15
        assert first.wait(timeout=600) == 128 + signal.SIGTERM


def test_export_and_eval_outputs_are_locked(fault_run, fault_shards, tmp_path):
    out = tmp_path / "model.onnx"
    holder = Holder(out, is_file=True)
    try:
        done = run_cf_child(["export", "--ckpt", fault_run, "--format", "onnx", "--out", out])
        assert done.returncode == 1, done.stderr
        _in_use(done.stderr, out, holder.proc.pid)
        metrics = tmp_path / "metrics.json"
        with hold_output(metrics, "cf test-holder", is_file=True):
            done = run_cf_child(["eval", "--ckpt", fault_run, "--data", fault_shards,
                                 "--out", metrics])  # fmt: skip
        assert done.returncode == 1 and "in use by another cf command" in done.stderr
    finally:
        holder.release()
    assert not out.exists()


def test_predict_into_a_folder_in_use_is_refused(fault_run, fault_raw, tmp_path):
    out = tmp_path / "pred"
    image = next((fault_raw / "images").iterdir())
    holder = Holder(out)
    try:
        done = run_cf_child(["predict", "--ckpt", fault_run, image, "--out", out])
        assert done.returncode == 1, done.stderr
        _in_use(done.stderr, out, holder.proc.pid)
        assert [p.name for p in out.iterdir()] == [".cf-lock"]  # the holder's own
    finally:
        holder.release()
