"""The shape of the code, checked from its source: no import cycle, imports run one way between
the layers, no long functions in ``cli/`` and ``engine/`` without a reason, metric keys typed
once.

What counts as an import. Every ``import`` statement of the package's modules, read with
``ast`` (nothing is imported here): module-level ones and function-local ones alike. A
function-local import only moves the moment a dependency is paid, not the dependency, so it
counts for the layering rule and for cycles (the old ``data/preprocess.py`` <->
``data/transforms.py`` cycle ran through a function-local import). Imports under
``if TYPE_CHECKING:`` are never executed: they count for the layering rule (a type from a
higher layer is still a dependency on it) but not for cycles (two modules naming each
other's types is how annotations are written).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Where each installed package's source lives (pyproject's package-dir).
PACKAGES = {"clusterformer.cli": ROOT / "cli", "clusterformer.data": ROOT / "data",
            "clusterformer": ROOT / "clusterformer"}  # fmt: skip

# The layering rule (docs/architecture.md, "Layers"): each layer and the layers it may import
# besides itself. ops <- models <- tasks <- engine <- {export, inference, bench} <- cli (bench
# also uses export: it times the graphs cf export writes); metrics
# sit between ops and tasks and read datasets through data; data depends only on ops. The
# leaf modules plugins.py (where task modules come from), registry.py (the registry helper)
# and extras.py (optional packages) import nothing of the project, so any layer may use them.
# "root" is clusterformer/__init__.py: the facade whose ``clusterformer.load`` is the
# inference API. "timm" is clusterformer/timm.py, the presets registered with timm: models
# seen from timm, nothing above models needs it. "runtime" is clusterformer/runtime.py, the
# process settings cf runs with, for a library user: a facade over engine's, used by the CLI.
LEAVES = {"plugins", "registry", "extras"}
BELOW_TASKS = {"ops", "data", "models", "metrics"} | LEAVES
BELOW_CLI = BELOW_TASKS | {"tasks", "engine", "export", "inference", "bench", "root", "runtime"}
MAY_IMPORT: dict[str, set[str]] = {
    **{leaf: set() for leaf in LEAVES},
    "ops": set(),
    "data": {"ops"} | LEAVES,
    "models": {"ops"} | LEAVES,
    "timm": {"models", "ops"} | LEAVES,
    "metrics": {"ops", "data"} | LEAVES,
    "tasks": BELOW_TASKS,
    "engine": BELOW_TASKS | {"tasks"},
    "export": BELOW_TASKS | {"tasks", "engine", "root"},
    "inference": BELOW_TASKS | {"tasks", "engine"},
    "bench": BELOW_TASKS | {"tasks", "engine", "export"},
    "runtime": {"engine"} | LEAVES,
    "cli": BELOW_CLI,
    "root": {"inference"},
}
MAX_FUNCTION_LINES = 60
LONG_REASON = "Long because"


@dataclass(frozen=True)
class Import:
    """One import statement's target: ``source`` imports ``target`` at ``line``."""

    source: str
    target: str
    line: int
    local: bool  # inside a function
    type_only: bool  # under ``if TYPE_CHECKING:``


def module_files() -> dict[str, Path]:
    """Every module of the package by its installed name (``clusterformer.data.loader``)."""
    modules: dict[str, Path] = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[0] in ("cli", "data") and package == "clusterformer":
                continue  # those folders are other packages (a symlinked checkout has them)
            if parts[-1] == "__init__":
                parts.pop()
            modules.setdefault(".".join([package, *parts]), path)
    return modules


def layer(module: str) -> str:
    """``clusterformer.engine.loop`` -> ``engine``; ``clusterformer.plugins`` -> ``plugins``;
    ``clusterformer`` -> ``root``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "root"


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _statements(tree: ast.Module) -> Iterator[tuple[ast.AST, bool, bool]]:
    """Every import statement with (inside a function, under TYPE_CHECKING)."""

    def walk(node: ast.AST, local: bool, type_only: bool) -> Iterator[tuple[ast.AST, bool, bool]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import | ast.ImportFrom):
                yield child, local, type_only
            inner = local or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            typed = type_only or (isinstance(child, ast.If) and _is_type_checking(child))
            yield from walk(child, inner, typed)

    yield from walk(tree, False, False)


def _owner(name: str, modules: dict[str, Path]) -> str | None:
    """The package module that ``name`` (a module or a name inside one) is, or lives in."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imports(modules: dict[str, Path]) -> list[Import]:
    """Every import of a package module by a package module."""
    found = []
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node, local, type_only in _statements(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                # ``from pkg import module`` imports that module; ``from module import name``
                # the module the name lives in.
                names = [f"{base}.{alias.name}" for alias in node.names]
            for name in names:
                target = _owner(name, modules)
                edge = Import(module, target or "", node.lineno, local, type_only)
                if target is not None and target != module and edge not in found:
                    found.append(edge)
    return found


def cycles(edges: list[Import]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    graph: dict[str, set[str]] = {}
    for edge in edges:
        graph.setdefault(edge.source, set()).add(edge.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


@pytest.fixture(scope="module")
def graph() -> list[Import]:
    return imports(module_files())


def test_the_import_reader_sees_every_kind_of_import(tmp_path: Path) -> None:
    """The checks below are only as good as this reader: relative, absolute, function-local
    and TYPE_CHECKING imports all come out, and a cycle through a local import is found."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\nfrom .b import thing\n")
    (pkg / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                              "    from pkg.c import T\n\ndef f():\n    import pkg.a\n")  # fmt: skip
    (pkg / "c.py").write_text("")
    modules = {"pkg": pkg / "__init__.py", "pkg.a": pkg / "a.py", "pkg.b": pkg / "b.py",
               "pkg.c": pkg / "c.py"}  # fmt: skip
    found = {(e.source, e.target, e.local, e.type_only) for e in imports(modules)}
    assert found == {("pkg.a", "pkg.b", False, False), ("pkg.b", "pkg.c", False, True),
                     ("pkg.b", "pkg.a", True, False)}  # fmt: skip
    assert cycles([e for e in imports(modules) if not e.type_only]) == [["pkg.a", "pkg.b"]]


def test_no_import_cycle(graph: list[Import]) -> None:
    loops = cycles([e for e in graph if not e.type_only])
    detail = [" <-> ".join(c) + ": " + "; ".join(
        f"{e.source} line {e.line} imports {e.target}" + (" (in a function)" if e.local else "")
        for e in graph if e.source in c and e.target in c and not e.type_only) for c in loops]
    assert not loops, "import cycles:\n" + "\n".join(detail)


def test_imports_run_one_way_between_layers(graph: list[Import]) -> None:
    modules = module_files()
    unknown = sorted({layer(m) for m in modules} - set(MAY_IMPORT))
    assert not unknown, f"layers the rule does not place: {unknown} (add them to MAY_IMPORT)"
    wrong = [f"{e.source} line {e.line} imports {e.target} ({layer(e.source)} -> "
             f"{layer(e.target)})" for e in graph  # fmt: skip
             if layer(e.target) != layer(e.source)
             and layer(e.target) not in MAY_IMPORT[layer(e.source)]]
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def _body_lines(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> tuple[int, str]:
    """Lines of ``fn`` (signature included) without its docstring, and the docstring."""
    doc = ast.get_docstring(fn) or ""
    first = fn.body[0]
    is_doc = (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
              and isinstance(first.value.value, str))  # fmt: skip
    doc_lines = first.end_lineno - first.lineno + 1 if is_doc else 0
    return fn.end_lineno - fn.lineno + 1 - doc_lines, doc


def test_no_long_functions_in_cli_and_engine_without_a_reason() -> None:
    long = []
    for folder in (ROOT / "cli", ROOT / "clusterformer" / "engine"):
        for path in sorted(folder.rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    lines, doc = _body_lines(node)
                    if lines > MAX_FUNCTION_LINES and LONG_REASON not in doc:
                        long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: "
                                    f"{lines} lines")  # fmt: skip
    assert not long, (f"functions over {MAX_FUNCTION_LINES} lines (docstring aside) whose "
                      f"docstring gives no reason ('{LONG_REASON} ...'):\n" + "\n".join(long))


# DESIGN.md section 4: the keys `cf eval` writes, per task.
DESIGN_KEYS = {
    "classification": ("top1", "top5"),
    "detection": ("bbox_AP", "bbox_AP50", "bbox_AP75"),
    "instance": ("segm_AP", "segm_AP50", "segm_AP75", "bbox_AP", "bbox_AP50", "bbox_AP75"),
    "semantic": ("mIoU", "aAcc"),
    "panoptic": ("PQ", "SQ", "RQ", "PQ_th", "PQ_st"),
}


def test_metric_keys_are_the_metric_modules_own() -> None:
    """Each task reports the keys its metric module defines (the same object, not a second
    spelling), and they are DESIGN.md's."""
    from clusterformer.metrics import coco, instance, panoptic, semantic, topk
    from clusterformer.tasks import task_spec

    owners = {"classification": topk, "detection": coco, "instance": instance,
              "semantic": semantic, "panoptic": panoptic}  # fmt: skip
    for task, module in owners.items():
        spec = task_spec(task)
        assert spec.metric_keys is module.METRIC_KEYS, f"{task} types its metric keys again"
        assert spec.metric_keys == DESIGN_KEYS[task]
        assert spec.primary_metric == DESIGN_KEYS[task][0]
    assert instance.BBOX_KEYS is coco.METRIC_KEYS
