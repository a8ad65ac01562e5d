"""Nox sessions: `nox -s tests` (default suite), `slow`, `lint`, `bench`, `timm`."""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.default_venv_backend = "venv"

TORCH = "torch==2.13.0"  # the CPU wheel; a bare `torch` would pull a multi-GB CUDA build
# timm needs torchvision, built for the same torch (2.N pairs with 0.(N+15)) and the same CPU
# build: PyPI's torchvision wheels are CUDA builds, which fail to load beside a CPU torch.
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
TIMM = "timm==1.0.31"


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


@nox.session
def timm(session: nox.Session) -> None:
    """The timm tests (tests/test_timm_*.py; the default suite skips them without timm), then
    timm's own model tests (tests/test_models.py of timm's sdist) on the presets."""
    session.install(TORCH, "torchvision==0.28.0", "--index-url", CPU_INDEX,
                    "--extra-index-url", "https://pypi.org/simple")  # fmt: skip
    session.install("-e", ".[test]", TIMM, "huggingface_hub")
    session.install("--no-deps", "panopticapi-lite")
    session.run("python", "-m", "pytest", "tests/test_timm_api.py", "tests/test_timm_backbone.py",
                *session.posargs)  # fmt: skip
    sdist = session.create_tmp()
    session.run("pip", "download", "--no-deps", "--no-binary", ":all:", TIMM, "-d", sdist)
    session.run("python", "-c", "import sys, tarfile, glob; tarfile.open(glob.glob(sys.argv[1] + "
                "'/timm-*.tar.gz')[0]).extractall(sys.argv[1], filter='data')", sdist)  # fmt: skip
    session.run("python", "benchmarks/timm_model_tests.py", f"{sdist}/{TIMM.replace('==', '-')}",
                "--models", "clusterformer_nano,clusterformer_tiny",
                "--select", "not fx and not torchscript")  # fmt: skip
