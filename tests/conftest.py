"""Suite-wide settings: property tests have no per-example deadline (a loaded machine is slow,
not wrong); explicit ``@settings`` still choose their own example counts.

The default profile draws the same examples on every run, so a CI result can be reproduced
here; ``HYPOTHESIS_PROFILE=explore`` draws fresh ones (to hunt for new counterexamples)."""

import os

import pytest
from hypothesis import settings

settings.register_profile("clusterformer", deadline=None, derandomize=True)
settings.register_profile("explore", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "clusterformer"))


# ----------------------------------------------------------------------------- fault tests
# Shared by test_faults.py and test_faults_input.py (session scope: built once).


@pytest.fixture(scope="session")
def fault_raw(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """A make-shapes folder: 16 scenes (COCO, panoptic, ADE) and 16 class pictures, 32 px."""
    from clusterformer.data.shapes import make_shapes

    root = tmp_path_factory.mktemp("faults") / "shapes"
    make_shapes(root, num_images=16, image_size=32, seed=0)
    return root


@pytest.fixture(scope="session")
def fault_shards(fault_raw):  # noqa: ANN001, ANN201
    """Its 16 class pictures as shards (2 shards of 8)."""
    from clusterformer.data.formats import open_source
    from clusterformer.data.shards import write_shards

    out = fault_raw.parent / "cls-shards"
    write_shards(open_source("imagefolder", fault_raw / "classes"), out, samples_per_shard=8)
    return out


@pytest.fixture(scope="session")
def fault_warm(fault_shards, tmp_path_factory):  # noqa: ANN001, ANN201
    """One training step in this process: children forked later start warm (imports,
    kernels), 0.6 s a run instead of 2."""
    from cli_runner import run_cf, train_argv

    assert run_cf(train_argv(fault_shards, tmp_path_factory.mktemp("warm") / "run", 1)) == 0


@pytest.fixture(scope="session")
def fault_run(fault_shards, fault_warm, tmp_path_factory):  # noqa: ANN001, ANN201
    """A 2-step classification run (checkpoints at steps 1 and 2); tests work on copies."""
    from cli_runner import train_argv
    from kill_points import in_child

    from clusterformer.cli.app import main

    run = tmp_path_factory.mktemp("trained") / "run"
    assert in_child(lambda: main(train_argv(fault_shards, run, 2, "--save-every", "1"))) == 0
    return run
