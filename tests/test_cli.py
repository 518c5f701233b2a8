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
    from .conftest import make_images

    data = make_images(tmp_path / "imgs", 30)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("base: default\npool:\n  include: [efn_3x3_e1_se1.00, "
                      "cb_bottle_3x3_ex0.125]\ndistill:\n  batch_size: 8\n"
                      "search:\n  k: 2\n  verify_rounds: 1\nfinetune:\n  epochs: 1\n"
                      "  batch_size: 8\ndata:\n  candidate_eval_images: 4\n  batch_size: 8\n")
    common = ["test_efficientnet", "--data", str(data), "--random-init", "--recipe",
              str(recipe), "--speedup", "0.9", "--work-dir", str(tmp_path / "w"), "--quiet"]
    res = CliRunner().invoke(hant, ["search", *common])
    assert res.exit_code == 0, res.output
    assert res.output.count("objective") == 2 and "best: " in res.output
    res = CliRunner().invoke(hant, ["finetune", *common])
    assert res.exit_code == 0, res.output
    assert "held-out images" in res.output and "student  top1" in res.output
