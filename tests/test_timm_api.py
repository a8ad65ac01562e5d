"""The presets as timm models (``import clusterformer.timm``): registration and cfg, timm's
``create_model`` as train.py calls it, ``features_only``, and a weights round trip through
timm's Hub machinery, offline. Needs timm (with a torchvision matching torch): skipped without.

timm's own model tests on the presets: benchmarks/timm_model_tests.py (README, "Use with
timm").
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

timm = pytest.importorskip("timm")

import clusterformer.timm as cf_timm  # noqa: E402
from clusterformer.models import ClusterFormer, create_model  # noqa: E402

NAMES = ["clusterformer_nano", "clusterformer_tiny", "clusterformer_small"]
README = Path(__file__).resolve().parents[1] / "README.md"


def test_every_preset_is_registered_with_a_full_cfg_and_no_claimed_weights() -> None:
    assert timm.list_models("clusterformer*") == sorted(NAMES)
    assert timm.list_pretrained("clusterformer*") == []  # no weights exist yet
    for name in NAMES:
        cfg = timm.models.get_pretrained_cfg(name).to_dict()
        assert cfg["mean"] == (0.485, 0.456, 0.406) and cfg["input_size"] == (3, 224, 224)
        assert cfg["crop_pct"] == 0.875 and cfg["interpolation"] == "bicubic"
        assert (cfg["first_conv"], cfg["classifier"], cfg["pool_size"]) == ("stem", "head", (7, 7))
        assert not any(cfg.get(key) for key in ("hf_hub_id", "url", "file"))
    with pytest.raises(RuntimeError):  # timm refuses pretrained=True: there is nothing to load
        timm.create_model("clusterformer_nano", pretrained=True)


def test_create_model_as_train_py_calls_it_builds_the_presets_network() -> None:
    """train.py passes drop_rate (and drop_path_rate, global_pool...); the network is the one
    clusterformer.models.create_model builds, tensor for tensor."""
    torch.manual_seed(0)
    model = timm.create_model("clusterformer_nano", num_classes=10, drop_rate=0.0,
                              drop_path_rate=0.1)  # fmt: skip
    ours = create_model("clusterformer-nano", num_classes=10)
    assert isinstance(model, ClusterFormer) and model.num_classes == 10
    assert model.stages[-1][-1].drop_path.rate == pytest.approx(0.1)
    assert {k: v.shape for k, v in model.state_dict().items()} == \
        {k: v.shape for k, v in ours.state_dict().items()}  # fmt: skip
    ours.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), ours.eval()(x))
    model.train()
    torch.nn.functional.cross_entropy(model(x), torch.tensor([1, 7])).backward()
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(TypeError):
        timm.create_model("clusterformer_nano", not_an_option=1)


def test_features_only_gives_the_four_stages_and_prunes_the_rest() -> None:
    torch.manual_seed(0)
    model = timm.create_model("clusterformer_nano").eval()
    features = timm.create_model("clusterformer_nano", features_only=True).eval()
    assert features.feature_info.reduction() == [4, 8, 16, 32]
    assert features.feature_info.channels() == [32, 64, 128, 256]
    features.model.load_state_dict(model.state_dict(), strict=False)  # the head was pruned
    x = torch.randn(1, 3, 72, 56)
    with torch.no_grad():
        maps, _ = model.forward_pyramid(x)
        assert all(torch.equal(a, b) for a, b in zip(features(x), maps, strict=True))
    two = timm.create_model("clusterformer_nano", features_only=True, out_indices=(0, 1))
    assert two.feature_info.reduction() == [4, 8] and len(two.model.stages) == 2
    names = [n for n, _ in two.named_parameters()]
    assert not any(".head" in n or n.startswith("model.stages.2") for n in names)


def _hf_cache(root: Path, repo_id: str, folder: Path) -> None:
    """A Hugging Face cache under ``root`` holding ``folder``'s files as repository
    ``repo_id``, laid out as huggingface_hub writes it: ``models--ORG--NAME/refs/main`` names the
    snapshot, ``snapshots/<commit>/`` holds the files."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for path in folder.iterdir():
        (snapshot / path.name).write_bytes(path.read_bytes())


def test_weights_round_trip_through_timms_hub_machinery_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """save_for_hf writes what push_to_hf_hub uploads (config.json + model.safetensors); an
    ``hf-hub:`` name reads it back from the cache with the Hub offline, and so does
    ``pretrained_cfg_overlay=dict(file=...)``, for another image channel count too."""
    import huggingface_hub

    torch.manual_seed(0)
    model = timm.create_model("clusterformer_nano", num_classes=7).eval()
    timm.models.save_for_hf(model, tmp_path / "export", safe_serialization=True,
                            model_args={"num_classes": 7})  # fmt: skip
    assert {p.name for p in (tmp_path / "export").iterdir()} >= {"config.json", "model.safetensors"}
    _hf_cache(tmp_path / "hub", "someone/clusterformer-nano-demo", tmp_path / "export")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    x = torch.randn(1, 3, 64, 64)
    loaded = timm.create_model("hf-hub:someone/clusterformer-nano-demo", pretrained=True,
                               cache_dir=tmp_path / "hub").eval()  # fmt: skip
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    # A file: its cfg says how many classes it holds (else timm drops a classifier that does
    # not match the preset's 1000).
    overlay = {"file": str(tmp_path / "export" / "model.safetensors"), "num_classes": 7}
    from_file = timm.create_model("clusterformer_nano", pretrained=True, num_classes=7,
                                  pretrained_cfg_overlay=overlay).eval()  # fmt: skip
    with torch.no_grad():
        assert torch.equal(from_file(x), model(x))
    # One image channel: timm adapts the image part of the stem, the coordinate channels stay.
    gray = timm.create_model("clusterformer_nano", pretrained=True, num_classes=7, in_chans=1,
                             pretrained_cfg_overlay=overlay)  # fmt: skip
    assert gray.stem.weight.shape[1] == 1 + cf_timm.COORD_CHANNELS
    assert torch.equal(gray.stem.weight[:, 1:], model.stem.weight[:, 3:])
    assert torch.allclose(gray.stem.weight[:, 0], model.stem.weight[:, :3].sum(1))


def test_readme_use_with_timm_examples_run() -> None:
    """The README's "Use with timm" Python blocks (```py: they need timm) run here."""
    section = README.read_text().split("## Use with timm", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```py\n(.*?)```", section, flags=re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, str(README), "exec"), {})
