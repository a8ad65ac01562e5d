"""Nox sessions: `nox -s tests` (default suite), `slow`, `lint`, `bench`."""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.default_venv_backend = "venv"

TORCH = "torch==2.13.0"  # the CPU wheel; a bare `torch` would pull a multi-GB CUDA build


def _install(session: nox.Session, extras: str = "test") -> None:
    session.install(TORCH)
    session.install("-e", f".[{extras}]")
    # The PQ test oracle: its only release pins numpy<2 but runs with numpy 2.
    session.install("--no-deps", "panopticapi-lite")


@nox.session
def tests(session: nox.Session) -> None:
    """The default, fast suite (slow tests deselected by pyproject's addopts)."""
    _install(session)
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session
def slow(session: nox.Session) -> None:
    """Only the heavy tests: big presets, compiled models, longer training."""
    _install(session)
    session.run("python", "-m", "pytest", "-m", "slow", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", ".")


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks; paste their tables into docs/benchmarks.md with machine and date."""
    _install(session)
    session.run("python", "benchmarks/bench_ops.py", *session.posargs)
    session.run("python", "benchmarks/bench_ops.py", "--backward", *session.posargs)
