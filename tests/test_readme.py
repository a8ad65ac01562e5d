"""The README's examples and commands are what users copy: keep them working."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_python_examples_run():
    # ```python blocks are self-contained and run here; ```py blocks need files (a model
    # export, an image) and are exercised by the export tests instead.
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    for block in blocks:
        exec(compile(block, str(README), "exec"), {})


def test_starts_with_install_and_test_commands():
    text = README.read_text()
    bash = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    assert "cf quickstart" in bash[0] and "pip install" in bash[0]
    assert "pytest" in bash[1] and "pip install" in bash[1]
    ci = (README.parent / ".ci" / "run").read_text()
    assert "python -m pytest" in ci and "python -m pytest" in bash[1]
