"""`cf predict` at scale: folders and globs batched through a DataLoader give the records of
each file predicted alone, JSON Lines output, video frames (when PyAV / imageio is installed)
or one "install the video extra" line, --slide / --tta through the CLI (asked of the task
registry), and errors that name the file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from cli_runner import run_cf as _cf
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from test_slide_tta import SMALL  # the small decoder every segmentation test trains

from clusterformer.data import make_shapes, open_source, write_shards
from clusterformer.engine.config_files import resolve_config
from clusterformer.engine.loop import train


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("predict-scale")
    made = make_shapes(root / "shapes", num_images=9, image_size=48, seed=0)
    out: dict = {"made": made, "root": root}
    sources = {
        "classification": open_source("imagefolder", Path(made["images"]).parent / "classes"),
        "semantic": open_source("ade20k", made["images"], made["classes_json"], made["semantic_masks"]),
    }
    for task, source in sources.items():
        shards = root / f"shards-{task}"
        write_shards(source, shards, samples_per_shard=8)
        extra = SMALL if task == "semantic" else {}
        cfg = resolve_config(task=task, data=str(shards), out=str(root / f"run-{task}"),
                             model="clusterformer-nano", steps=1, batch_size=2, image_size=32,
                             lr=1e-3, device="cpu", log_every=1, **extra)
        out[task] = train(cfg, handle_signals=False).run_dir
    return out


def _records(folder: Path) -> list[dict]:
    return json.loads((folder / "predictions.json").read_text())


def _same_records(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x["image"] == y["image"] and [c["label"] for c in x["classes"]] == [c["label"] for c in y["classes"]]
        assert [c["score"] for c in x["classes"]] == pytest.approx([c["score"] for c in y["classes"]], abs=2e-4)


def test_a_folder_batched_gives_the_records_of_each_file_alone(runs: dict, tmp_path: Path) -> None:
    folder = Path(runs["made"]["images"]).parent / "classes"
    files = sorted(p for p in folder.rglob("*.jpg"))
    assert len(files) >= 8
    assert _cf(["predict", "--ckpt", str(runs["classification"]), str(folder), "--out", str(tmp_path / "all"),
                "--batch-size", "5", "--workers", "2"]) == 0
    batched = _records(tmp_path / "all")
    assert [r["image"] for r in batched] == [str(p) for p in files]
    alone = []
    for i, path in enumerate(files):
        assert _cf(["predict", "--ckpt", str(runs["classification"]), str(path), "--out", str(tmp_path / f"one{i}"),
                    "--batch-size", "1"]) == 0
        alone.extend(_records(tmp_path / f"one{i}"))
    _same_records(batched, alone)
    # every image has its overlay and its own JSON, equal to its line in predictions.json
    for record in batched:
        stem = Path(record["image"]).stem
        assert (tmp_path / "all" / f"{stem}.png").is_file()
    # a quoted glob finds the same files
    pattern = str(folder / "*" / "*.jpg")
    assert _cf(["predict", "--ckpt", str(runs["classification"]), pattern, "--out", str(tmp_path / "glob")]) == 0
    _same_records(_records(tmp_path / "glob"), batched)


def test_jsonl_has_one_record_per_image(runs: dict, tmp_path: Path) -> None:
    folder = Path(runs["made"]["images"]).parent / "classes"
    assert _cf(["predict", "--ckpt", str(runs["classification"]), str(folder), "--out", str(tmp_path / "a")]) == 0
    lines = tmp_path / "records.jsonl"
    assert _cf(["predict", "--ckpt", str(runs["classification"]), str(folder), "--out", str(tmp_path / "b"),
                "--jsonl", str(lines), "--batch-size", "3"]) == 0
    streamed = [json.loads(line) for line in lines.read_text().splitlines()]
    _same_records(streamed, _records(tmp_path / "a"))
    assert not (tmp_path / "b" / "predictions.json").exists()
    assert len(list((tmp_path / "b").glob("*.png"))) == len(streamed)


def _tiny_video(path: Path, frames: int) -> None:
    av = pytest.importorskip("av")
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 48, 32, "yuv420p"
        for i in range(frames):
            pixels = np.zeros((32, 48, 3), dtype=np.uint8)
            pixels[:, : 4 * (i + 1)] = (200, 60, 30)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_a_video_gives_one_overlay_and_record_per_frame(runs: dict, tmp_path: Path) -> None:
    video = tmp_path / "clip.mp4"
    _tiny_video(video, 10)
    image, after = sorted(Path(runs["made"]["images"]).glob("*.jpg"))[:2]
    out = tmp_path / "pred"
    assert _cf(["predict", "--ckpt", str(runs["semantic"]), str(image), str(video), str(after),
                "--out", str(out), "--batch-size", "4", "--workers", "2"]) == 0
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(records) == 12 and records[0]["image"] == str(image) and "frame" not in records[0]
    assert records[-1]["image"] == str(after) and (out / f"{after.stem}.png").is_file()
    frames = records[1:-1]
    assert [r["frame"] for r in frames] == list(range(10))
    assert all(r["image"] == str(video) and (r["height"], r["width"]) == (32, 48) for r in frames)
    overlays = sorted((out / "clip").glob("*.png"))
    assert [p.name for p in overlays] == [f"{i:06d}.png" for i in range(10)]
    assert Image.open(overlays[0]).size == (48 * 6, 32 * 6)  # small frames are drawn enlarged


def test_without_a_video_reader_one_line_says_what_to_install(
    runs: dict, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import clusterformer.data.video as video

    monkeypatch.setattr(video, "video_backend", lambda: None)
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"\0" * 64)
    code = _cf(["predict", "--ckpt", str(runs["semantic"]), str(clip), "--out", str(tmp_path / "p")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1
    assert str(clip) in err[0] and "install the video extra: pip install 'clusterformer[video]'" in err[0]


def test_a_broken_video_is_named(runs: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("av")
    clip = tmp_path / "broken.mp4"
    clip.write_bytes(b"not a video at all" * 10)
    code = _cf(["predict", "--ckpt", str(runs["semantic"]), str(clip), "--out", str(tmp_path / "p")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and str(clip) in err[0] and "cannot decode video" in err[0]
    assert not (tmp_path / "p").exists()  # nothing written; the folder it made is gone


def test_a_corrupt_image_in_a_folder_is_named_and_nothing_is_left(
    runs: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    for path in sorted(Path(runs["made"]["images"]).glob("*.jpg"))[:3]:
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "zz-corrupt.png").write_bytes(b"\x89PNG not really")
    out = tmp_path / "p"
    code = _cf(["predict", "--ckpt", str(runs["semantic"]), str(folder), "--out", str(out),
                "--batch-size", "2", "--workers", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and str(folder / "zz-corrupt.png") in err[0] and "cannot decode" in err[0]
    assert not out.exists()  # nothing written; the folder it made is gone
    code = _cf(["predict", "--ckpt", str(runs["semantic"]), str(folder / "missing.jpg"), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and str(folder / "missing.jpg") in err[0]


def test_slide_and_tta_through_the_cli(runs: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    image = sorted(Path(runs["made"]["images"]).glob("*.jpg"))[0]
    out = tmp_path / "slide"
    assert _cf(["predict", "--ckpt", str(runs["semantic"]), str(image), "--out", str(out),
                "--image-size", "96", "--slide", "32", "24", "--tta", "flip,0.75"]) == 0
    record = _records(out)[0]
    assert record["segments"] and all(s["rle"]["size"] == [48, 48] for s in record["segments"])
    # classification takes TTA but no sliding windows: the registry says so, in one line
    code = _cf(["predict", "--ckpt", str(runs["classification"]), str(image), "--out", str(tmp_path / "c"),
                "--slide", "32", "16"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--slide: the classification task does not support it" in err[0]
    assert _cf(["predict", "--ckpt", str(runs["classification"]), str(image), "--out", str(tmp_path / "t"),
                "--tta", "flip,1.25", "--max-dets", "3"]) == 0
    assert _records(tmp_path / "t")[0]["classes"]


def test_eval_takes_slide_and_tta(runs: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    shards = runs["root"] / "shards-semantic"
    plain, slid = tmp_path / "plain.json", tmp_path / "slid.json"
    assert _cf(["eval", "--ckpt", str(runs["semantic"]), "--data", str(shards), "--out", str(plain),
                "--image-size", "64", "--batch-size", "4"]) == 0
    assert _cf(["eval", "--ckpt", str(runs["semantic"]), "--data", str(shards), "--out", str(slid),
                "--image-size", "64", "--batch-size", "4", "--slide", "32", "16", "--tta", "flip"]) == 0
    first, second = json.loads(plain.read_text()), json.loads(slid.read_text())
    assert 0.0 <= second["mIoU"] <= 100.0 and second["num_images"] == first["num_images"] == 9
    assert second["slide"] == [32, 16] and second["tta"] == "flip" and "slide" not in first
    code = _cf(["eval", "--ckpt", str(runs["classification"]), "--data", str(runs["root"] / "shards-classification"),
                "--slide", "16", "16"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "--slide: the classification task does not support it" in err[-1]


def test_imageio_reads_the_same_frames_as_pyav(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("imageio")
    import clusterformer.data.video as video

    clip = tmp_path / "clip.mp4"
    _tiny_video(clip, 5)
    by_av = list(video.video_frames(clip))
    monkeypatch.setattr(video, "video_backend", lambda: "imageio")
    by_imageio = list(video.video_frames(clip))
    assert len(by_av) == len(by_imageio) == 5
    assert all(a.shape == b.shape == (32, 48, 3) and b.dtype == np.uint8 for a, b in zip(by_av, by_imageio, strict=True))
    assert all(np.abs(a.astype(int) - b.astype(int)).max() <= 2 for a, b in zip(by_av, by_imageio, strict=True))


def test_a_large_set_streams_json_lines(runs: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import clusterformer.cli.predict_cmd as predict_cmd

    monkeypatch.setattr(predict_cmd, "LARGE_SET", 3)  # as if the folder held more than 1000
    folder = Path(runs["made"]["images"]).parent / "classes"
    out = tmp_path / "p"
    assert _cf(["predict", "--ckpt", str(runs["classification"]), str(folder), "--out", str(out)]) == 0
    lines = (out / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 9 and not (out / "predictions.json").exists() and not list(out.glob("*.json"))
    assert len(list(out.glob("*.png"))) == 9


@settings(max_examples=30, deadline=None)
@given(height=st.integers(1, 40), width=st.integers(1, 40), seed=st.integers(0, 2**16),
       level=st.integers(0, 9))  # fmt: skip
def test_overlay_png_encoder_is_lossless(height: int, width: int, seed: int, level: int) -> None:
    import io

    from clusterformer.cli.predict_outputs import encode_rgb_png

    rgb = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    decoded = Image.open(io.BytesIO(encode_rgb_png(rgb, level)))
    decoded.load()  # a wrong CRC or a short IDAT raises here
    assert decoded.mode == "RGB" and np.array_equal(np.asarray(decoded), rgb)


def test_overlay_png_encoder_names_a_wrong_shape() -> None:
    from clusterformer.cli.predict_outputs import encode_rgb_png

    for bad in (np.zeros((4, 4), np.uint8), np.zeros((4, 4, 4), np.uint8), np.zeros((0, 4, 3), np.uint8)):
        with pytest.raises(ValueError, match="expected a non-empty"):
            encode_rgb_png(bad)
