"""The README's "Python API" examples (```python api blocks: one per task) run as written
against a small checkpoint of each task and a photo (their placeholder paths replaced)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python api\n(.*?)```", README.read_text(), flags=re.S)
# The placeholders the examples load, and the task_runs entry each stands for.
RUNS = {"runs/cls": "classification", "runs/det": "detection", "runs/ins": "instance",
        "runs/sem": "semantic", "runs/pan": "panoptic"}  # fmt: skip


def test_there_is_an_example_per_task() -> None:
    used = [[name for name in RUNS if f'"{name}"' in block] for block in BLOCKS]
    assert sorted(name for names in used for name in names) == sorted(RUNS)
    assert all(len(names) == 1 for names in used)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_python_api_example_runs(index: int, task_runs: dict, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    code = BLOCKS[index]
    code = code.replace('"photo.jpg"', repr(str(task_runs["images"][0])))
    for name, task in RUNS.items():
        code = code.replace(f'"{name}"', repr(str(task_runs[task])))
    monkeypatch.chdir(tmp_path)  # the examples save their drawings here
    exec(compile(code, f"{README}: python api example {index + 1}", "exec"), {})
    drawn = list(tmp_path.glob("photo-*.png"))
    assert len(drawn) == 1 and drawn[0].stat().st_size > 0
    assert capsys.readouterr().out.strip()  # each example prints what it found
