"""Run timm's own model tests (``tests/test_models.py`` from the sdist of the installed timm) on
the ClusterFormer presets, unchanged.

    pip download --no-deps --no-binary :all: timm==1.0.31 -d /tmp/timm-sdist
    tar xzf /tmp/timm-sdist/timm-1.0.31.tar.gz -C /tmp/timm-sdist
    OMP_NUM_THREADS=1 python benchmarks/timm_model_tests.py /tmp/timm-sdist/timm-1.0.31 \\
        --models clusterformer_nano,clusterformer_tiny [--select EXPR] [-- PYTEST_ARGS]

(in a venv with timm and a torchvision that matches torch: README, "Use with timm").

How test_models.py picks models: when it is imported, its parametrize lists call
``timm.list_models`` over timm's registry; the forward_intermediates and pruning tests only take
models of the modules it names (``FEAT_INTER_FILTERS``, timm's own model files). This script
registers the presets first (``import clusterformer.timm``), adds the module they are
registered under to every such module list, and runs pytest on test_models.py with ``-k``
keeping the presets' tests only. Nothing in test_models.py is edited; pytest-timeout is not
needed (without it the tests' timeout marks are inert).
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path


def _include_module(list_models, module_name: str):  # noqa: ANN001, ANN202 - wraps timm's
    """``timm.list_models`` whose ``module`` filter, when given, also takes ``module_name``."""

    @functools.wraps(list_models)
    def wrapped(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        module = kwargs.get("module", args[1] if len(args) > 1 else "")
        if module:
            modules = [module] if isinstance(module, str) else list(module)
            if len(args) > 1:
                args = (args[0], [*modules, module_name], *args[2:])
            else:
                kwargs["module"] = [*modules, module_name]
        return list_models(*args, **kwargs)

    return wrapped


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sdist", type=Path, help="the unpacked timm sdist (holds tests/)")
    parser.add_argument("--models", default="clusterformer_nano,clusterformer_tiny,"
                        "clusterformer_small", help="comma-separated timm names")  # fmt: skip
    parser.add_argument("--select", default="", help="a further -k expression over the test "
                        "names, e.g. 'not fx and not torchscript'")  # fmt: skip
    args, pytest_args = parser.parse_known_args()  # the rest (after --) goes to pytest
    pytest_args = [a for a in pytest_args if a != "--"]
    tests = args.sdist / "tests" / "test_models.py"
    if not tests.is_file():
        print(f"{tests}: not found (unpack timm's sdist, see --help)", file=sys.stderr)
        return 2

    import pytest
    import timm
    from timm.models import _registry

    import clusterformer.timm  # noqa: F401 - registers the presets

    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in timm.list_models("clusterformer*")]
    if unknown:
        print(f"--models: unknown {unknown}; registered: {timm.list_models('clusterformer*')}",
              file=sys.stderr)  # fmt: skip
        return 2
    module_name = _registry._model_to_module[names[0]]
    timm.list_models = _include_module(timm.list_models, module_name)
    # -k on the parametrized ids: "test_model_forward[clusterformer_nano-1]" and the like.
    keep = " or ".join(names)
    if args.select:  # one -k only: pytest keeps the last one it is given
        keep = f"({keep}) and ({args.select})"
    return int(pytest.main([str(tests), "-p", "no:cacheprovider", "-rA", "-k", keep,
                            "-W", "ignore::pytest.PytestUnknownMarkWarning",
                            "--rootdir", str(args.sdist), *pytest_args]))  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
