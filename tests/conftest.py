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


# ----------------------------------------------------------------------- one run per task
# Shared by test_inference_api.py and test_readme_api.py (session scope: built once).


@pytest.fixture(scope="session")
def task_runs(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """A 1-step clusterformer-nano run folder per built-in task (small decoder, 32 px) on a
    make-shapes folder, its images and shards: ``{"images": [paths], "shards": {task: shard
    folder}, task: run folder, ...}``.
    Panoptic keeps every center (``task.object_threshold=0``) so that it writes segments."""
    from pathlib import Path

    from clusterformer.data import make_shapes, open_source, write_shards
    from clusterformer.engine.config_files import resolve_config
    from clusterformer.engine.loop import train

    root = tmp_path_factory.mktemp("task-runs")
    made = make_shapes(root / "shapes", num_images=4, image_size=48, seed=0)
    sources = {
        "classification": open_source("imagefolder", Path(made["images"]).parent / "classes"),
        "detection": open_source("coco", made["images"], made["instances"]),
        "instance": open_source("coco", made["images"], made["instances"]),
        "semantic": open_source("ade20k", made["images"], made["classes_json"], made["semantic_masks"]),
        "panoptic": open_source("coco-panoptic", made["images"], made["panoptic_json"],
                                made["panoptic_masks"]),
    }
    small = {"hidden_dim": 32, "decoder_heads": 2, "decoder_ffn_dim": 64, "num_queries": 10,
             "decoder_layers": 3}
    runs: dict = {"images": sorted(Path(made["images"]).glob("*.jpg")), "shards": {}}
    for task, source in sources.items():
        shards = root / f"shards-{task}"
        write_shards(source, shards, samples_per_shard=8)
        extra = {} if task == "classification" else small
        sets = ["task.object_threshold=0.0"] if task == "panoptic" else []
        cfg = resolve_config(task=task, data=str(shards), out=str(root / f"run-{task}"),
                             model="clusterformer-nano", steps=1, batch_size=2, image_size=32,
                             lr=1e-3, device="cpu", log_every=1, sets=sets, **extra)
        runs[task] = train(cfg, handle_signals=False).run_dir
        runs["shards"][task] = shards
    # A 1-step model's instance and panoptic masks are all empty (every mask logit < 0): a bare
    # checkpoint with a random shift of the mask embedding gives them masks to write and draw.
    for task in ("instance", "panoptic"):
        runs[task] = _shift_mask_embedding(runs[task], root / f"{task}.safetensors")
    return runs


def _shift_mask_embedding(run, target):  # noqa: ANN001, ANN202
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from clusterformer.engine.checkpoint import resolve_checkpoint

    with safe_open(str(resolve_checkpoint(run)), "pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - no iteration on f
    bias = tensors["mask_embed.layers.2.bias"]
    shift = torch.randn(bias.shape, generator=torch.Generator().manual_seed(0))
    tensors["mask_embed.layers.2.bias"] = bias + 5 * shift
    save_file(tensors, str(target), metadata=metadata)
    return target


# -------------------------------------------------------------- a collapsed semantic model
# Shared by test_collapse_warning.py and test_eval_readable.py (session scope: built once).


@pytest.fixture(scope="session")
def collapsed_semantic(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """A 1-step semantic clusterformer-nano run on 4 make-shapes scenes whose dataset lists two
    classes no pixel has ("unused-a", "unused-b"), and a copy of its weights whose class head
    puts every query in class "sky": ``{"images", "shards", "run", "collapsed", "class"}``."""
    import json
    from pathlib import Path

    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from clusterformer.data import make_shapes, open_source, write_shards
    from clusterformer.engine.checkpoint import resolve_checkpoint
    from clusterformer.engine.config_files import resolve_config
    from clusterformer.engine.loop import train

    root = tmp_path_factory.mktemp("collapsed")
    made = make_shapes(root / "shapes", num_images=4, image_size=48, seed=0)
    shards = root / "shards"
    write_shards(open_source("ade20k", made["images"], made["classes_json"],
                             made["semantic_masks"]), shards, samples_per_shard=8)  # fmt: skip
    info = json.loads((shards / "dataset.json").read_text())
    last = max(int(c["id"]) for c in info["categories"])
    info["categories"] += [{"id": last + 1 + i, "name": name, "isthing": False,
                            "train_id": len(info["categories"]) + i}
                           for i, name in enumerate(("unused-a", "unused-b"))]  # fmt: skip
    (shards / "dataset.json").write_text(json.dumps(info))
    cfg = resolve_config(task="semantic", data=str(shards), out=str(root / "run"),
                         model="clusterformer-nano", steps=1, batch_size=2, image_size=32,
                         lr=1e-3, device="cpu", log_every=1, hidden_dim=32, decoder_heads=2,
                         decoder_ffn_dim=64, num_queries=10, decoder_layers=3)  # fmt: skip
    run = train(cfg, handle_signals=False).run_dir
    sky = next(c["train_id"] for c in info["categories"] if c["name"] == "sky")
    with safe_open(str(resolve_checkpoint(run)), "pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - no iteration on f
    for key in [k for k in tensors if k.endswith("class_head.bias")]:
        bias = torch.zeros_like(tensors[key])
        bias[sky] = 50.0  # every query's class: sky, far above "no object" and the rest
        tensors[key] = bias
    save_file(tensors, str(root / "collapsed.safetensors"), metadata=metadata)
    return {"images": sorted(Path(made["images"]).glob("*.jpg")), "shards": shards, "run": run,
            "collapsed": root / "collapsed.safetensors", "class": "sky"}
