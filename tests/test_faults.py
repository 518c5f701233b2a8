"""Faults a long run meets on a shared machine (the CI-sized subset of
``benchmarks/fault_matrix.py``): a kill in every phase, two runs on one work dir, a damaged
artifact, odd image files, a full or read-only disk, bad checkpoints, a failing Hub."""

from __future__ import annotations

import errno
import json
import logging
import os
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from compressor.cli import compress_main

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import fault_matrix as fm  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> fm.Setup:
    return fm.make_setup(tmp_path_factory.mktemp("faults"), n_images=12, finetune_epochs=1)


@pytest.fixture(scope="module")
def pair(setup) -> dict[str, Path]:
    """Two runs started together on one work dir (speedups 0.9 and 0.8): the outputs, which
    the other tests take as the uninterrupted runs."""
    work = setup.root / "w-pair"
    outs = {s: setup.root / f"out-pair-{s}" for s in ("0.9", "0.8")}
    procs = fm.concurrent([fm.compress_cmd(setup, work, o, s) for s, o in outs.items()])
    for p in procs:
        assert p.returncode == 0, p.stderr[-2000:]
    return outs | {"work": work}


def test_two_runs_on_one_work_dir_compute_each_artifact_once(pair):
    recs = [fm.phase_record(pair[s]) for s in ("0.9", "0.8")]
    # the shared artifacts (LUT, distilled ops, fitness) were computed by one of the two
    assert sorted(r["fitness"]["cached"] for r in recs) == [False, True]
    assert [r["finetune"]["cached"] for r in recs] == [False, False]  # two budgets, two models
    last = json.loads(next(pair["work"].glob("*/distill/*/last_run.json")).read_text())
    assert [r["trained"] for r in last["ranks"]] == [recs[0]["distill"]["ops"]]
    assert not list(pair["work"].rglob("*.tmp"))
    assert fm.outputs(pair["0.9"])[0] != [] and fm.outputs(pair["0.8"])[0] != []


def test_a_kill_in_every_phase_resumes_to_the_same_model(setup, pair):
    """``kill -9`` once in each phase, each time running the same command again (the run
    killed next): the finished run equals the uninterrupted one bit for bit."""
    work, out = setup.root / "w-kill", setup.root / "out-kill"
    cmd = fm.compress_cmd(setup, work, out)
    landed = []
    for phase in fm.PHASES:
        landed.append(fm.kill_in_phase(cmd, phase, 0.0, out))
    proc = fm.run(cmd)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert landed == fm.PHASES
    same, detail = fm.compare(pair["0.9"], out)
    assert same, detail
    assert not list(out.parent.glob(f".{out.name}.*")), "a killed publish left its folder"


def test_a_damaged_op_is_recomputed_with_one_warning(setup, pair, tmp_path, caplog):
    work = pair["work"]
    op = sorted(work.glob("*/distill/*/*/*.safetensors"))[0]
    fm.damage(op, "flip")
    out = tmp_path / "out"
    args = fm.compress_cmd(setup, work, out)[3:] + ["--quiet"]
    with caplog.at_level(logging.WARNING):
        res = CliRunner().invoke(compress_main, args)
    assert res.exit_code == 0, res.output
    warned = [r.getMessage() for r in caplog.records if "recomputing it" in r.getMessage()]
    assert len(warned) == 1 and "checksum mismatch" in warned[0] and op.name in warned[0]
    same, detail = fm.compare(pair["0.9"], out)
    assert same, detail


def test_damaged_json_and_tensor_files_are_detected(tmp_path):
    import torch

    from compressor._errors import ArtifactError
    from compressor.store import Store, check_seal, seal

    store = Store(tmp_path)
    js, ts = tmp_path / "a.json", tmp_path / "t.safetensors"
    store.write_json(js, {"a": [0.125, 2.5]})
    store.save_tensors(ts, {"w": torch.arange(64.0)})
    for path, how in ((js, "flip-digit"), (ts, "flip"), (ts, "cut")):
        good = path.read_bytes()
        fm.damage(path, how)
        with pytest.raises(ArtifactError, match="corrupt|unreadable"):
            store.read_json(path) if path.suffix == ".json" else store.load_tensors(path)
        path.write_bytes(good)
    assert store.read_json(js) == {"a": [0.125, 2.5]}
    # a file another package writes (the work dir's LUT) is sealed beside it
    lut = tmp_path / "lut.json"
    lut.write_text('{"entries": {"op": {"ms": 0.125}}}')
    seal(lut)
    check_seal(lut)
    fm.damage(lut, "flip-digit")
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        check_seal(lut)


def test_odd_image_files_are_decoded_or_skipped_and_counted(tmp_path):
    from timm.data import create_transform

    from compressor.data import ImagePart, scan_images

    root, bad = fm.image_zoo(tmp_path / "zoo", good=4)
    images = scan_images(root)  # the folder linked to its parent is walked once
    assert len(images) == 4 + 10  # the good ones and the odd files, the loop not repeated
    part = ImagePart(images, range(len(images)), create_transform(32))
    seen = sum(len(b) for b in part.batches(4))
    assert seen == len(images) - bad
    assert sorted(Path(s.split(":")[0]).name for s in part.skipped) == [
        "loop_a.jpg", "loop_b.jpg", "notes.jpg", "truncated.jpg", "zero.jpg"]


def _compress(setup, work, out, checkpoint=None):
    return CliRunner().invoke(compress_main, fm.compress_cmd(setup, work, out,
                                                             checkpoint=checkpoint)[3:]
                              + ["--quiet"])


def test_a_full_disk_is_one_line_exit_2_and_nothing_half_written(setup, pair, tmp_path,
                                                                   monkeypatch):
    """The work dir's artifacts cached, the disk fills up while the output folder is written:
    one line, exit 2, no output and no partial folder left."""
    import safetensors.torch

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "model.safetensors")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    out = tmp_path / "out"
    res = _compress(setup, pair["work"], out)
    assert res.exit_code == 2, res.output
    assert res.output.strip().startswith("error: cannot write model.safetensors: No space left")
    assert len(res.output.strip().splitlines()) == 1
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_a_read_only_work_dir_is_one_line_exit_2(setup, tmp_path, monkeypatch):
    import filelock

    def refuse(self, *args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(tmp_path / "w" / "x.lock"))

    monkeypatch.setattr(filelock.FileLock, "acquire", refuse)
    out = tmp_path / "out"
    res = _compress(setup, tmp_path / "w", out)
    assert res.exit_code == 2, res.output
    assert "cannot write" in res.output and "Read-only file system" in res.output
    assert len(res.output.strip().splitlines()) == 1 and not out.exists()


def test_checkpoints_that_are_not_this_models_weights_are_refused_in_one_line(setup, tmp_path):
    import subprocess

    import timm
    import torch

    evil = tmp_path / "evil.pth"
    torch.save({"hook": subprocess.CompletedProcess}, evil)
    other = tmp_path / "resnet.pth"
    torch.save(timm.create_model("test_resnet").state_dict(), other)
    for path, message in ((evil, "holds pickled Python objects"),
                          (other, "missing key 'conv_stem.weight'")):
        res = _compress(setup, tmp_path / "w", tmp_path / "out", path)
        assert res.exit_code == 2 and message in res.output, res.output
        assert len(res.output.strip().splitlines()) == 1
        assert "weights_only=False" not in res.output


def test_an_upload_dropped_mid_way_is_one_line_without_the_token(pair, monkeypatch):
    from compressor.cli import hant
    from tests.fake_hub import FakeHub

    folder = pair["0.8"]
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.name != "README.md"}
    hub = FakeHub(folder.parent / "hub", fail_with="drop", fail_on="commit")
    monkeypatch.setenv("HF_TOKEN", "hf_secret_fault_token")
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", hub.url)
    monkeypatch.setattr("huggingface_hub.utils._http.time.sleep", lambda s: None)  # retries
    try:
        res = CliRunner().invoke(hant, ["push", str(folder), "org/tiny"])
    finally:
        hub.close()
    assert hub.failed and res.exit_code == 2, res.output
    assert res.output.startswith("error: upload to org/tiny failed")
    assert len(res.output.strip().splitlines()) == 1
    assert "hf_secret_fault_token" not in res.output
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.name != "README.md"} == before
