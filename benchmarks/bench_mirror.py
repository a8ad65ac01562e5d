"""The flip check's statistic (``data/augment_policy.py::mirror_asymmetry``) on real data, whole
sets and random 128-image draws (docs/benchmarks.md, "Classification defaults vs a classical
baseline"): scikit-learn's digits, the shared flower photos, COCO-128 object crops by category.

    python benchmarks/bench_mirror.py [--draws 20]

Needs scikit-learn for the digits (the ``bench`` extra); prints one line per data set.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from clusterformer.data.augment_policy import PEEK, mirror_asymmetry

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)


def digits() -> list[tuple[torch.Tensor, int]]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return [(tensor(Image.fromarray((im / 16 * 255).astype(np.uint8)).resize((32, 32), Image.BILINEAR)), int(y))
            for im, y in zip(data.images, data.target, strict=True)]  # fmt: skip


def flowers() -> list[tuple[torch.Tensor, int]]:
    root = SHARED / "classification" / "tf_flowers_cc_by"
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    return [(tensor(Image.open(f)), classes.index(f.parent.name)) for f in sorted(root.glob("*/*.jpg"))]


def coco_crops(min_side: int = 24) -> list[tuple[torch.Tensor, int]]:
    root = SHARED / "coco_instances" / "coco128_train2017"
    ann = json.loads(next((root / "annotations").glob("*.json")).read_text())
    files = {im["id"]: im["file_name"] for im in ann["images"]}
    out, opened = [], {}
    for a in ann["annotations"]:
        x, y, w, h = a["bbox"]
        if w < min_side or h < min_side:
            continue
        name = files[a["image_id"]]
        if name not in opened:
            opened[name] = Image.open(root / "images" / name).convert("RGB")
        out.append((tensor(opened[name].crop((x, y, x + w, y + h))), int(a["category_id"])))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=20)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    for name, load in (("digits", digits), ("flowers", flowers), ("coco-crops", coco_crops)):
        items = load()
        whole = mirror_asymmetry(*zip(*items, strict=True))
        draws = []
        if len(items) > PEEK:
            for _ in range(args.draws):
                pick = rng.choice(len(items), PEEK, replace=False)
                draws.append(mirror_asymmetry(*zip(*(items[i] for i in pick), strict=True)))
        span = f"; {len(draws)} draws of {PEEK}: {min(draws) * 100:.1f} to {max(draws) * 100:.1f} %" if draws else ""
        print(f"{name}: {len(items)} images, whole set {whole * 100:.1f} %{span}")


if __name__ == "__main__":
    main()
