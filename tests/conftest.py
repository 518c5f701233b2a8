"""Shared fixtures: synthetic image folders, the shared real images, a fast recipe."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from compressor.recipe import load_recipe

SHARED_IMAGES = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-sample"
WNIDS = ["n01440764", "n01443537", "n01484850", "n01491361", "n01494475"]  # classes 0..4


def make_images(root: Path, n: int, size: int = 48, wnids=WNIDS, seed: int = 0) -> Path:
    """n random RGB images spread over wnid folders."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        d = root / wnids[i % len(wnids)] if wnids else root
        d.mkdir(parents=True, exist_ok=True)
        arr = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
        Image.fromarray(arr).save(d / f"img{i}.png")
    return root


def random_instance(n: int = 6, m: int = 4, seed: int = 0):
    """A seeded (a, b) search instance: teacher loss 0 and cost 1, m cheaper lossier ops."""
    rng = random.Random(seed)
    a, b = [], []
    for _ in range(n):
        a.append({"teacher": 0.0, **{f"op{j}": rng.uniform(0.01, 1) for j in range(m)}})
        b.append({"teacher": 1.0, **{f"op{j}": rng.uniform(0.05, 0.9) for j in range(m)}})
    return a, b


@pytest.fixture
def images(tmp_path) -> Path:
    return make_images(tmp_path / "images", 40)


@pytest.fixture
def fast_recipe():
    """A tiny recipe: a handful of ops, short training, few solutions."""
    r = load_recipe("default")
    r = r.override("pool", include=["identity", "efn_3x3_e1_se1.00", "cb_bottle_3x3_ex0.125",
                                    "mlp_e0.25"])
    r = r.override("distill", epochs=1, batch_size=8)
    r = r.override("search", k=4, time_limit=10, calibration_archs=0)
    r = r.override("finetune", epochs=1, batch_size=8)
    return r.override("data", candidate_eval_images=8, batch_size=8)
