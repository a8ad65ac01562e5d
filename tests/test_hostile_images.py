"""Issue 21, hostile inputs: a pixel limit for every decode (``--max-image-pixels``).

A few-KB PNG can say 10000 x 9000 and decode to gigabytes. Every decode refuses an image over
the limit from its header, before decoding, with one line naming the file and the flag; in
``cf shard-dataset`` and the training loader that refusal is a bad sample (``--on-error``).
Checkpoint preprocess records that would resize to absurd sizes are refused on load.

Big images are written by hand (1-bit PNG rows of zeros, streamed through zlib): 10000 x 9000
is 11 KB on disk and never held decoded. The rest use a lowered limit and small images.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from cli_runner import run_cf, train_argv
from fault_kit import error_line
from PIL import Image, ImageFile
from safetensors.torch import load_file, save_file

from clusterformer.cli import image_limit
from clusterformer.data import LoaderSpec, build_loader, images
from clusterformer.data import preprocess as preprocess_module
from clusterformer.data.errors import ImageDecodeError, SampleError
from clusterformer.data.formats import open_source
from clusterformer.data.preprocess import (
    MAX_PREPROCESS_SIDE,
    EvalPreprocess,
    apply_preprocess,
    default_eval_preprocess,
)
from clusterformer.data.shards import write_shards
from clusterformer.engine.checkpoint import CheckpointError, encode_metadata, read_metadata
from clusterformer.engine.evaluate import load_model_from_checkpoint

DEFAULT = images.DEFAULT_MAX_IMAGE_PIXELS
LEGACY_CKPT = Path(__file__).parent / "fixtures" / "legacy" / "classification.safetensors"
DECODERS = [images.decode_image_array, images.decode_image, images.decode_label_map,
            images.decode_panoptic_png]  # fmt: skip


def blank_png(width: int, height: int) -> bytes:
    """A valid 1-bit grey PNG of zeros, built row by row (nothing of its size in memory)."""

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    row = bytes(1 + (width + 7) // 8)  # filter byte + packed bits
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat)
            + chunk(b"IEND", b""))  # fmt: skip


def grey_png(path: Path, side: int, value: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (side, side), (value, 255 - value, 128)).save(path)
    return path


@pytest.fixture(scope="module")
def big_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """10000 x 9000 = 90,000,000 px: just over the default, under Pillow's own refusal (2x)."""
    path = tmp_path_factory.mktemp("big") / "big.png"
    path.write_bytes(blank_png(10000, 9000))
    assert path.stat().st_size < 50_000
    return path


@pytest.fixture(autouse=True)
def _limit_restored(monkeypatch: pytest.MonkeyPatch):  # noqa: ANN202
    """Each test starts at this process's limit and leaves it (and the variable) as found."""
    before = images.max_image_pixels()
    monkeypatch.delenv(images.MAX_IMAGE_PIXELS_ENV, raising=False)
    yield
    images.set_max_image_pixels(before)  # monkeypatch then restores the variable itself


def _no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def load(self):  # noqa: ANN001, ANN202
        raise AssertionError("decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)


def _cf(args: list[object], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    code = run_cf([str(a) for a in args])
    return code, capsys.readouterr().err


# ----------------------------------------------------------------------------- decoding
@pytest.mark.parametrize("decode", DECODERS, ids=lambda f: f.__name__)
def test_an_image_over_the_limit_is_refused_from_its_header(
    decode: Callable[[bytes, str], object], big_png: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_decoding(monkeypatch)  # refused before Pillow decodes a pixel
    with pytest.raises(ImageDecodeError) as caught:
        decode(big_png.read_bytes(), str(big_png))
    assert str(caught.value) == (f"{big_png}: 10000 x 9000 = 90000000 pixels is over the limit "
                                 "of 89478485; raise it with --max-image-pixels")  # fmt: skip


def test_far_over_the_limit_pillows_own_refusal_reads_the_same() -> None:
    # 20000 x 10000 is over 2 x the limit, where Pillow refuses inside Image.open.
    with pytest.raises(ImageDecodeError, match=r"^huge\.png: 200000000 pixels is over the "
                       r"limit of 89478485; raise it with --max-image-pixels$"):  # fmt: skip
        images.decode_image_array(blank_png(20000, 10000), "huge.png")


def test_a_lowered_limit_refuses_above_it_and_decodes_up_to_it() -> None:
    images.set_max_image_pixels(1000)
    assert images.max_image_pixels() == 1000 == Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageDecodeError, match=r"^b\.png: 40 x 40 = 1600 pixels .* 1000;"):
        images.decode_image_array(blank_png(40, 40), "b.png")
    assert images.decode_image_array(blank_png(30, 30), "a.png").shape == (30, 30, 3)
    assert images.decode_label_map(blank_png(25, 40), "a.png").shape == (40, 25)
    with pytest.raises(ValueError, match="whole number of pixels >= 1"):
        images.set_max_image_pixels(0)


def test_a_raised_limit_reaches_the_decoder_past_pillows_own(
    monkeypatch: pytest.MonkeyPatch, recwarn: pytest.WarningsRecorder
) -> None:
    # 200 Mpx: over Pillow's default refusal (2 x 89.5 M). Not decoded for real (800 MB):
    # reaching load() shows that neither our check nor Pillow's refused it.
    images.set_max_image_pixels(250_000_000)
    _no_decoding(monkeypatch)
    with pytest.raises(ImageDecodeError, match=r"cannot decode image \(decoded\)"):
        images.decode_image_array(blank_png(20000, 10000), "huge.png")
    assert images.image_format_extension(blank_png(20000, 10000)) == "png"
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]


def test_the_limit_reaches_spawned_workers_through_the_environment() -> None:
    images.set_max_image_pixels(1234)
    assert images.MAX_IMAGE_PIXELS_ENV == image_limit.ENV
    with multiprocessing.get_context("spawn").Pool(1) as pool:  # re-imports, inherits nothing
        assert pool.apply(images.max_image_pixels) == 1234


def test_cli_and_library_agree_on_the_default() -> None:
    assert image_limit.DEFAULT_MAX_IMAGE_PIXELS == DEFAULT == 89_478_485
    assert Image.MAX_IMAGE_PIXELS == DEFAULT  # Pillow's own default: nothing moved by import


# ----------------------------------------------------------------------------- cf predict
def test_predict_refuses_an_image_over_the_default_limit(
    big_png: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    code, err = _cf(["predict", "--ckpt", LEGACY_CKPT, big_png, "--out", tmp_path / "p"], capsys)
    line = error_line(err)
    assert code == 1 and str(big_png) in line and "--max-image-pixels" in line, line
    assert "10000 x 9000" in line


def test_predict_follows_max_image_pixels_and_leaves_the_limit_as_it_was(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    small, large = grey_png(tmp_path / "small.png", 30), grey_png(tmp_path / "large.png", 40)
    argv = ["predict", "--ckpt", LEGACY_CKPT, "--out", tmp_path / "p", "--workers", "0"]
    code, err = _cf([*argv, large, "--max-image-pixels", 1000], capsys)
    line = error_line(err)
    assert code == 1 and f"{large}: 40 x 40 = 1600 pixels" in line and "1000" in line, line
    # an in-process run leaves no limit behind
    assert images.max_image_pixels() == DEFAULT and images.MAX_IMAGE_PIXELS_ENV not in os.environ
    assert _cf([*argv, small, "--max-image-pixels", 1000], capsys)[0] == 0
    assert _cf([*argv, large, "--max-image-pixels", 1600], capsys)[0] == 0  # at the limit: fine
    code, err = _cf([*argv, small, "--max-image-pixels", 0], capsys)
    assert code == 2 and "--max-image-pixels" in error_line(err)


def test_predict_reads_the_limit_from_the_environment(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    large = grey_png(tmp_path / "large.png", 40)
    monkeypatch.setenv(images.MAX_IMAGE_PIXELS_ENV, "1000")
    code, err = _cf(["predict", "--ckpt", LEGACY_CKPT, large, "--out", tmp_path / "p"], capsys)
    assert code == 1 and f"{large}: 40 x 40" in error_line(err)


# Commands that read no image files (make-shapes writes them, export traces random input).
NOT_DECODING = ["models", "make-shapes", "export", "plot", "benchmark"]


def test_the_flag_is_on_exactly_the_commands_that_decode(
    capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "250")
    for command in ["train", *image_limit.DECODING_COMMANDS, *NOT_DECODING]:
        assert run_cf([command, "--help"]) == 0
        out = capsys.readouterr().out
        if command in NOT_DECODING:
            assert "--max-image-pixels" not in out, command
        else:
            assert "--max-image-pixels" in out and "default: 89478485" in out, out


# ----------------------------------------------------------------------------- shards, training
@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """An ImageFolder: 6 pictures of 32 x 32 (1024 px) and a 40 x 40 one (1600 px)."""
    root = tmp_path / "classes"
    for i in range(6):
        grey_png(root / ("a" if i % 2 else "b") / f"{i}.png", 32, value=i * 40)
    grey_png(root / "b" / "wide.png", 40)
    return root


def _shard(folder: Path, out: Path, *extra: object) -> list[object]:
    return ["shard-dataset", "--format", "imagefolder", "--images", folder, "--out", out, *extra]


def test_shard_dataset_stops_at_an_image_over_the_limit_naming_it(
    folder: Path, big_png: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    (folder / "a" / "big.png").write_bytes(big_png.read_bytes())
    code, err = _cf(_shard(folder, tmp_path / "out"), capsys)
    line = error_line(err)
    assert code == 1 and str(folder / "a" / "big.png") in line and "(sample " in line, line
    assert "10000 x 9000 = 90000000 pixels" in line and "--max-image-pixels" in line, line
    assert not (tmp_path / "out" / "dataset.json").exists()


def test_shard_dataset_skips_and_counts_with_on_error_skip(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    code, err = _cf(_shard(folder, out, "--on-error", "skip", "--max-image-pixels", 1500), capsys)
    assert code == 0, err
    info = json.loads((out / "dataset.json").read_text())
    assert info["skipped"] == 1 and info["num_samples"] == 6
    (skipped,) = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert skipped["path"] == str(folder / "b" / "wide.png") and "1600 pixels" in skipped["reason"]
    code, err = _cf(_shard(folder, tmp_path / "all", "--max-image-pixels", 1600), capsys)
    assert code == 0, err  # raised to the image's size: all 7 written
    assert json.loads((tmp_path / "all" / "dataset.json").read_text())["num_samples"] == 7


@pytest.fixture
def shards(folder: Path, tmp_path: Path) -> Path:
    out = tmp_path / "shards"
    write_shards(open_source("imagefolder", folder), out, samples_per_shard=4)
    return out


def test_the_training_loader_stops_or_skips_an_image_over_the_limit(shards: Path) -> None:
    images.set_max_image_pixels(1500)
    # One batch of all 7, no shuffle buffer: the 40 x 40 picture is read whatever the order.
    kwargs = {"batch_size": 7, "image_size": 32, "train": True, "shuffle_buffer": 1}
    with pytest.raises(SampleError, match=r"shard-\d+\.tar \(sample .*1600 pixels .*"
                       r"--max-image-pixels"):  # fmt: skip
        list(build_loader(shards, "classification", LoaderSpec(**kwargs)))
    loader = build_loader(shards, "classification", LoaderSpec(on_error="skip", **kwargs))
    with pytest.warns(UserWarning, match="skipped bad sample.*1600 pixels"):
        batches = list(loader)
    assert len(batches) == len(loader) == 1 and batches[0]["images"].shape[0] == 7


def test_cf_train_follows_max_image_pixels(
    shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    code, err = _cf(train_argv(shards, tmp_path / "run", 1, "--max-image-pixels", "1000"), capsys)
    line = error_line(err)
    assert code == 1 and "shard-" in line and "(sample " in line, line
    assert "1024 pixels is over the limit of 1000" in line and "--max-image-pixels" in line


# ----------------------------------------------------------------------------- resizes
def _with_preprocess(tmp_path: Path, record: dict) -> Path:
    meta = {k: v for k, v in read_metadata(LEGACY_CKPT).items() if k != "format"}
    meta["preprocess"] = record
    bad = tmp_path / "huge.safetensors"
    save_file(load_file(str(LEGACY_CKPT)), str(bad), metadata=encode_metadata(meta))
    return bad


@pytest.mark.parametrize(
    ("change", "words"),
    [({"size": 10**6, "crop": 10**6, "resize_to": 10**6}, f"1 to {MAX_PREPROCESS_SIDE} px"),
     ({"resize": "square", "resize_to": 10000, "crop": None}, "10000 x 10000 = 100000000"),
     ({"resize_to": float("inf")}, "whole numbers")],
)  # fmt: skip
def test_a_checkpoint_asking_for_a_huge_resize_is_refused_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture, change: dict, words: str
) -> None:
    record = {**default_eval_preprocess("image", 224).to_dict(), **change}
    bad = _with_preprocess(tmp_path, record)
    with pytest.raises(CheckpointError, match=r"huge\.safetensors: unusable preprocess record"):
        load_model_from_checkpoint(bad)
    image = grey_png(tmp_path / "x.png", 32)
    code, err = _cf(["predict", "--ckpt", bad, image, "--out", tmp_path / "p"], capsys)
    line = error_line(err)
    assert code == 1 and str(bad) in line and words in line, line


def test_a_sane_record_is_still_accepted() -> None:
    record = default_eval_preprocess("dense", MAX_PREPROCESS_SIDE)  # long side: R x 1 at least
    assert EvalPreprocess.from_dict(record.to_dict()) == record
    images.set_max_image_pixels(10)  # a lowered decode limit does not refuse model sizes
    assert default_eval_preprocess("image", 224).resize_to == 256


def test_an_extreme_aspect_ratio_is_refused_before_resizing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 2 x 100000 px (200 KB) with its short side to 256: 256 x 12.8 M = 3.3 Gpx.
    monkeypatch.setattr(preprocess_module, "resize", lambda *a, **k: pytest.fail("resized"))
    sample = {"key": "strip.png", "image": torch.zeros((3, 2, 100000), dtype=torch.uint8)}
    pattern = (
        r"^strip\.png: 100000 x 2 resized .*\(short side 256, centre crop 224\) is "
        r"12800000 x 256 .* --max-image-pixels$"
    )
    with pytest.raises(ImageDecodeError, match=pattern):
        apply_preprocess(default_eval_preprocess("image", 224), sample)
