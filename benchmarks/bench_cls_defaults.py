"""Default ``cf train`` (classification) against a logistic regression on raw pixels, on the
same train / val split (docs/benchmarks.md, "Classification defaults vs a classical baseline").

Datasets (written as ImageFolder PNGs, then split by ``cf shard-dataset --val-fraction``):

* ``digits``: scikit-learn's bundled 8x8 handwritten digits (1797 real images, 10 classes),
  upscaled to 32 px (bilinear) -- the small low-resolution real set of issue 16;
* ``synthetic``: 10 classes of 32 px drawn shapes (5 shapes x filled/outline) at random
  position, size, colour and background with pixel noise, 1800 images;
* ``flowers``: the shared flower sample (50 photos, 5 classes), at 64 px.

Usage: ``OMP_NUM_THREADS=1 python benchmarks/bench_cls_defaults.py WORKDIR DATASET EPOCHS
[IMAGE_SIZE] [extra cf train flags...]``; prints one JSON line. Needs scikit-learn (the
baseline; the ``bench`` extra) besides the package.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

FLOWERS = Path("/work/shared/datasets/classification/tf_flowers_cc_by")


def write_digits(root: Path) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i, (image, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        pixels = (image / 16.0 * 255).astype(np.uint8)
        folder = root / f"digit{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).convert("RGB").resize((32, 32), Image.BILINEAR).save(
            folder / f"{i:05d}.png")


def write_synthetic(root: Path, per_class: int = 180, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    shapes = ("circle", "square", "triangle", "cross", "diamond")
    for shape in shapes:
        for filled in (True, False):
            folder = root / f"{shape}-{'filled' if filled else 'outline'}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                bg = tuple(int(v) for v in rng.integers(0, 256, 3))
                fg = tuple(int(v) for v in (np.array(bg) + rng.integers(80, 176, 3)) % 256)
                image = Image.new("RGB", (32, 32), bg)
                draw = ImageDraw.Draw(image)
                r = float(rng.uniform(6, 12))
                cx, cy = (float(v) for v in rng.uniform(r + 1, 31 - r, 2))
                box = (cx - r, cy - r, cx + r, cy + r)
                kw = {"fill": fg} if filled else {"outline": fg, "width": 2}
                if shape == "circle":
                    draw.ellipse(box, **kw)
                elif shape == "square":
                    draw.rectangle(box, **kw)
                elif shape == "triangle":
                    draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], **kw)
                elif shape == "diamond":
                    draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], **kw)
                else:
                    w = r / 3 if filled else r / 6
                    draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fg)
                    draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fg)
                noisy = np.asarray(image, np.float32) + rng.normal(0, 12, (32, 32, 3))
                Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(folder / f"{i:04d}.png")


def cf(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "clusterformer.cli", *args], capture_output=True,
                          text=True, timeout=3600, check=False)
    if done.returncode:
        raise SystemExit(f"cf {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return done.stdout


def raw_pixels(shards: Path, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Every image of a shard folder resized to size x size, flattened, and its label."""
    from clusterformer.data import LoaderSpec, build_loader
    from clusterformer.data.preprocess import EvalPreprocess

    pre = EvalPreprocess("square", size, None, (0.0,) * 3, (1.0,) * 3, size)
    loader = build_loader(str(shards), "classification", LoaderSpec(batch_size=64, image_size=size,
                          train=False, preprocess=pre))
    xs, ys = [], []
    for batch in loader:
        keep = batch.get("valid")
        images, labels = batch["images"], batch["labels"]
        if keep is not None:
            images, labels = images[keep], labels[keep]
        xs.append(images.flatten(1).numpy())
        ys.append(labels.numpy())
    return np.concatenate(xs), np.concatenate(ys)


def logistic_regression(work: Path, size: int) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    x_train, y_train = raw_pixels(work / "shards" / "train", size)
    x_val, y_val = raw_pixels(work / "shards" / "val", size)
    scaler = StandardScaler().fit(x_train)
    model = LogisticRegression(max_iter=2000, C=1.0)
    model.fit(scaler.transform(x_train), y_train)
    return 100.0 * float((model.predict(scaler.transform(x_val)) == y_val).mean())


def main() -> None:
    work, dataset, epochs = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    size = int(sys.argv[4]) if len(sys.argv) > 4 else (64 if dataset == "flowers" else 32)
    extra = sys.argv[5:]
    raw = work / "raw"
    if not raw.exists():
        if dataset == "digits":
            write_digits(raw)
        elif dataset == "synthetic":
            write_synthetic(raw)
        else:
            raw = FLOWERS
    if not (work / "shards" / "val" / "dataset.json").exists():
        cf("shard-dataset", "--format", "imagefolder", "--images", str(raw), "--out",
           str(work / "shards"), "--val-fraction", "0.2", "--seed", "0")
    baseline = logistic_regression(work, size)
    run = work / ("run-" + "-".join([epochs, str(size), *[a.strip("-") for a in extra]]))
    started = time.time()
    out = cf("train", "--task", "classification", "--model", "clusterformer-nano",
             "--data", str(work / "shards" / "train"), "--val-data", str(work / "shards" / "val"),
             "--out", str(run), "--epochs", epochs, "--image-size", str(size), "--device", "cpu",
             "--restart", *extra)
    seconds = time.time() - started
    metrics = json.loads(cf("eval", "--ckpt", str(run), "--data", str(work / "shards" / "val"),
                            "--out", str(run / "val.json"), "--device", "cpu")
                         and (run / "val.json").read_text())
    start_line = next((line for line in out.splitlines() if line.startswith("cf: ")), "")
    augment = json.loads((run / "config.json").read_text())["run"]["augment"]
    print(json.dumps({"dataset": dataset, "epochs": float(epochs), "image_size": size,
                      "extra": extra, "train_seconds": round(seconds, 1),
                      "top1": metrics["top1"], "logreg_top1": round(baseline, 2),
                      "start_line": start_line, "augment": augment}))


if __name__ == "__main__":
    main()
