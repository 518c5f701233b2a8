"""Bad inputs: one clear line, exit code 2, nothing written."""

import pytest
from click.testing import CliRunner

from compressor.cli import compress_main, hant


@pytest.fixture
def small_pool(tmp_path):
    """A recipe with three ops per layer (the full pool has ~300: LUTs would take minutes)."""
    path = tmp_path / "small.yaml"
    path.write_text("base: default\npool:\n  include: [identity, efn_3x3_e1_se1.00, "
                    "cb_bottle_3x3_ex0.125]\n")
    return str(path)


def _run(args, tmp_path):
    out = tmp_path / "out"
    res = CliRunner().invoke(compress_main, [*args, "--output", str(out), "--quiet",
                                             "--work-dir", str(tmp_path / "work")])
    return res, out


@pytest.mark.parametrize(
    "args,message",
    [
        (["efficientnet_b99", "--speedup", "0.5"], "unknown model 'efficientnet_b99'"),
        (["test_efficientnet", "--speedup", "1.5", "--random-init"], "must be in (0, 1)"),
        (["test_efficientnet", "--speedup", "0", "--random-init"], "must be in (0, 1)"),
        (["test_efficientnet", "--speedup", "abc", "--random-init"], "must be a number"),
        (["test_efficientnet", "--random-init", "--target", "tpu"], "unknown target 'tpu'"),
        (["resnet50"], "no weights for 'resnet50'"),
        (["test_efficientnet", "--random-init", "--private"], "go with --push-to-hub"),
        (["test_efficientnet", "--random-init", "--revision", "v1"], "go with --push-to-hub"),
        (["test_efficientnet", "--random-init", "--push-to-hub", "tiny"], "wants ORG/NAME"),
        (["test_efficientnet", "--random-init", "--push-to-hub", "org/a b"],
         "is not a Hub repo id"),
    ],
)
def test_bad_arguments(args, message, images, tmp_path):
    res, out = _run([*args, "--data", str(images)], tmp_path)
    assert res.exit_code == 2, res.output
    assert message in res.output
    assert len(res.output.strip().splitlines()) == 1
    assert not out.exists()


def test_bad_data(tmp_path):
    res, out = _run(["test_efficientnet", "--random-init", "--data", str(tmp_path / "nope")],
                    tmp_path)
    assert res.exit_code == 2 and "does not exist" in res.output and not out.exists()
    (tmp_path / "empty").mkdir()
    res, out = _run(["test_efficientnet", "--random-init", "--data", str(tmp_path / "empty")],
                    tmp_path)
    assert res.exit_code == 2 and "holds no images" in res.output and not out.exists()


def test_corrupt_lut(images, tmp_path):
    lut = tmp_path / "lut.json"
    lut.write_text("{ not json")
    res, out = _run(["test_efficientnet", "--random-init", "--data", str(images),
                     "--lut", str(lut)], tmp_path)
    assert res.exit_code == 2 and "corrupt" in res.output and not out.exists()


def test_speedup_below_reachable_minimum(images, tmp_path, small_pool):
    res, out = _run(["test_efficientnet", "--random-init", "--data", str(images),
                     "--speedup", "0.01", "--recipe", small_pool], tmp_path)
    assert res.exit_code == 2, res.output
    assert "ask for a speedup of at least" in res.output
    assert not out.exists()


def test_split_and_pool_commands():
    res = CliRunner().invoke(hant, ["split", "test_resnet"])
    assert res.exit_code == 0 and "layer1.0" in res.output
    res = CliRunner().invoke(hant, ["pool", "list", "test_resnet", "--json"])
    assert res.exit_code == 0 and '"layer1.0"' in res.output
    res = CliRunner().invoke(hant, ["lut", "targets"])
    assert res.exit_code == 0 and "cpu" in res.output


def test_lut_file_workflow(images, tmp_path, small_pool):
    lut = tmp_path / "lut.json"
    build = ["lut", "build", "test_resnet", "-o", str(lut), "--quiet", "--recipe", small_pool]
    res = CliRunner().invoke(hant, build)
    assert res.exit_code == 0, res.output
    # a LUT of another model is refused, naming the first missing entry
    res, out = _run(["test_efficientnet", "--random-init", "--data", str(images),
                     "--lut", str(lut), "--recipe", small_pool], tmp_path)
    assert res.exit_code == 2 and "has no entry for op" in res.output and not out.exists()
    # a second build adds nothing: latency does not depend on the (random) weights
    import json

    before = set(json.loads(lut.read_text())["entries"])
    res = CliRunner().invoke(hant, build)
    assert res.exit_code == 0 and "wrote" in res.output
    assert set(json.loads(lut.read_text())["entries"]) == before
    # calibrated on networks measured end to end; the fit is stored in the file
    res = CliRunner().invoke(hant, ["lut", "calibrate", "test_resnet", "-o", str(lut), "--quiet",
                                    "--recipe", small_pool, "--archs", "3"])
    assert res.exit_code == 0 and "calibrated" in res.output and "median error" in res.output
    cal = json.loads(lut.read_text())["calibration"]
    assert cal["archs"] == 3 and cal["scale"] > 0
    res = CliRunner().invoke(hant, ["lut", "calibrate", "test_resnet", "-o", str(lut),
                                    "--target", "v100", "--quiet", "--recipe", small_pool])
    assert res.exit_code == 2 and "holds the LUT of target 'cpu'" in res.output
    res = CliRunner().invoke(hant, ["lut", "calibrate", "test_resnet", "-o",
                                    str(tmp_path / "v100.json"), "--target", "v100", "--quiet",
                                    "--recipe", small_pool])
    assert res.exit_code == 2 and "needs its hardware here" in res.output


def test_a_bad_device_is_one_line_and_exit_2(tmp_path):
    from click.testing import CliRunner

    from compressor.cli import compress_main

    from .conftest import make_images

    data = make_images(tmp_path / "imgs", 10)
    res = CliRunner().invoke(compress_main, ["test_efficientnet", "--data", str(data),
                                             "--random-init", "--device", "tpu", "-o",
                                             str(tmp_path / "out"), "--quiet"])
    assert res.exit_code == 2
    assert res.output.strip().count("\n") == 0 and "runtime.device is 'tpu'" in res.output


def test_cuda_asked_for_where_there_is_none_is_one_line(tmp_path):
    import pytest
    import torch
    from click.testing import CliRunner

    from compressor.cli import compress_main

    from .conftest import make_images

    if torch.cuda.is_available():
        pytest.skip("the message is for machines without CUDA")
    data = make_images(tmp_path / "imgs", 10)
    res = CliRunner().invoke(compress_main, ["test_efficientnet", "--data", str(data),
                                             "--random-init", "--device", "cuda", "-o",
                                             str(tmp_path / "out"), "--quiet"])
    assert res.exit_code == 2 and "not available here" in res.output


def test_hant_search_and_finetune_commands(tmp_path):
    """The phase commands run the pipeline's steps over one work dir: search prints the K
    solutions and the best, finetune the summary on the held-out images."""
    data, recipe = _tiny_run(tmp_path)
    common = ["test_efficientnet", "--data", str(data), "--random-init", "--recipe",
              str(recipe), "--speedup", "0.9", "--work-dir", str(tmp_path / "w"), "--quiet"]
    res = CliRunner().invoke(hant, ["search", *common])
    assert res.exit_code == 0, res.output
    assert res.output.count("objective") == 2 and "best: " in res.output
    res = CliRunner().invoke(hant, ["finetune", *common])
    assert res.exit_code == 0, res.output
    assert "held-out images" in res.output and "student  top1" in res.output


def test_compress_help_shows_the_quickstart():
    res = CliRunner().invoke(compress_main, ["--help"])
    assert res.exit_code == 0
    for line in ("Quickstart", "compress tf_efficientnet_lite0 --target cpu --speedup 0.5",
                 "hant report runs/tf_efficientnet_lite0-cpu-0.5",
                 'timm.create_model("local-dir:runs/tf_efficientnet_lite0-cpu-0.5"',
                 "--push-to-hub ORG/NAME", "runs/MODEL-TARGET-SPEEDUP"):
        assert line in res.output, line


def test_default_output_folder():
    from pathlib import Path

    from compressor.cli import default_output

    assert default_output("tf_efficientnet_lite0", "cpu", "0.5") == Path(
        "runs/tf_efficientnet_lite0-cpu-0.5")
    assert default_output("test_vit", "v100", "0.8, 0.65") == Path("runs/test_vit-v100-0.8_0.65")
    assert default_output("hf-hub:org/x", "cpu", "0.5") == Path("runs/hf-hub_org_x-cpu-0.5")


def test_compress_quiet_json_default_output_and_push(tmp_path, monkeypatch):
    """What a script sees: `compress --quiet --json` (in a subprocess, so that anything a
    library prints to the real stdout or stderr shows) writes runs/MODEL-TARGET-SPEEDUP,
    prints the headline, where it wrote and uploaded, and the report's summary as its last
    line, nothing else (no third-party banners); it pushes to the Hub with the revision; `hant
    report` reads the folder back, as text and as the same JSON."""
    import json
    import os
    import subprocess
    import sys

    import timm
    import torch

    import compressor  # noqa: F401  (registers the architecture for hf-hub:)

    from .fake_hub import FakeHub

    data, recipe = _tiny_run(tmp_path)
    hub = FakeHub(tmp_path / "hub")
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": "hf_secret_token",
           "HF_HUB_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-c", "from compressor.cli import compress_main; compress_main()",
           "test_efficientnet", "--data", str(data), "--random-init", "--recipe", str(recipe),
           "--speedup", "0.9,0.8", "--work-dir", str(tmp_path / "w"), "--quiet", "--json",
           "--push-to-hub", "org/tiny", "--revision", "v1"]
    try:
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=600)
    finally:
        hub.close()
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 6, proc.stdout
    assert lines[0].startswith("teacher  top1") and lines[2].startswith("speedup  requested 0.9")
    assert lines[3] == "wrote runs/test_efficientnet-cpu-0.9_0.8"
    assert lines[4] == f"uploaded to {hub.url}/org/tiny/commit/abc123"
    assert "hf_secret_token" not in proc.stdout
    out = json.loads(lines[-1])
    folder = tmp_path / "runs" / "test_efficientnet-cpu-0.9_0.8"
    report = json.loads((folder / "report.json").read_text())
    assert out["output"] == "runs/test_efficientnet-cpu-0.9_0.8"
    assert out["hub_commit"].endswith("/org/tiny/commit/abc123")
    assert out["choices"] == report["student"]["choices"]
    assert out["speedup"]["measured"] == report["speedup"]["measured"]
    assert [p["speedup_requested"] for p in out["front"]] == [0.9, 0.8]
    assert out["complexity"]["teacher"]["params_m"] > 0
    for name in ("front.png", "layers.png", "search_front.png", "front.md", "README.md",
                 "onnx/model.onnx"):
        assert (folder / name).is_file(), name
    stored = tmp_path / "hub" / "org" / "tiny" / "v1"
    assert "hf-hub:org/tiny" in (stored / "README.md").read_text()
    (commit,) = hub.commits
    assert commit["summary"].startswith("HANT test_efficientnet for cpu: measured speedup")

    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(hant, ["report", "runs/test_efficientnet-cpu-0.9_0.8"])
    assert res.exit_code == 0, res.output
    assert "chosen ops per stage:" in res.output and "search front" in res.output
    assert "size     params" in res.output and "student  top1" in res.output
    res = CliRunner().invoke(hant, ["report", "runs/test_efficientnet-cpu-0.9_0.8", "--json"])
    assert res.exit_code == 0 and json.loads(res.output) == {
        k: v for k, v in out.items() if k != "hub_commit"}
    res = CliRunner().invoke(hant, ["report", str(tmp_path / "imgs")])
    assert res.exit_code == 2 and "has no report.json" in res.output

    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        local = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
        hub_copy = timm.create_model(f"local-dir:{stored}", pretrained=True).eval()
        assert torch.allclose(local(x), hub_copy(x), atol=1e-6)


def _tiny_run(tmp_path):
    """30 synthetic images and a recipe file for a two-op, one-epoch run of the CLI."""
    from .conftest import make_images

    data = make_images(tmp_path / "imgs", 30)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("base: default\npool:\n  include: [efn_3x3_e1_se1.00, "
                      "cb_bottle_3x3_ex0.125]\ndistill:\n  batch_size: 8\n"
                      "search:\n  k: 2\n  verify_rounds: 1\nfinetune:\n  epochs: 1\n"
                      "  batch_size: 8\ndata:\n  candidate_eval_images: 4\n  batch_size: 8\n")
    return data, recipe


def test_compress_with_named_layers_writes_a_model_that_loads(tmp_path):
    """`compress --layers` splits as `hant split --layers` does, and the written model records
    the patterns, so timm and compressor.load split the teacher the same way again."""
    import json

    import timm
    import torch

    import compressor

    data, recipe = _tiny_run(tmp_path)
    out = tmp_path / "named"
    res = CliRunner().invoke(compress_main, [
        "test_resnet", "--random-init", "--data", str(data), "--recipe", str(recipe),
        "--speedup", "0.9", "--layers", "layer*", "--work-dir", str(tmp_path / "w"),
        "--output", str(out), "--quiet", "--no-onnx"])
    assert res.exit_code == 0, res.output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_args"]["layers"] == ["layer*"]
    assert len(cfg["model_args"]["choices"]) == 4  # layer1..layer4, not the 8 blocks
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        via_timm = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
        via_load = compressor.load(out, teacher=timm.create_model("test_resnet"))
        assert torch.allclose(via_timm(x), via_load(x), atol=1e-6)
