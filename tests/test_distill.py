"""The distillation engine: results independent of the schedule (cache, group size, which other
ops train beside), memory-sized groups, op-granular resume, failed ops, and two torchrun
processes giving the single-process pool."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

import compressor
from compressor import _parallel
from compressor import distill as distill_mod
from compressor.data import Images
from compressor.distill import auto_group_size, distill, op_seed
from compressor.recipe import DistillCfg, load_recipe
from compressor.store import Store

from .conftest import make_images

REPO = Path(__file__).resolve().parents[1]
OPS = ["efn_3x3_e1_se1.00", "cb_bottle_3x3_ex0.125"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: small and steady timings on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    s = compressor.split(timm.create_model("test_efficientnet").eval(), input_size=(3, 64, 64))
    x = torch.randn(12, *s.input_size, generator=torch.Generator().manual_seed(1))
    images = Images(x, torch.full((12,), -1))
    cands = {i: ["teacher", *OPS] for i in range(3)}
    return s, images, cands


def _run(tiny, tmp_path, name, cands=None, **cfg):
    s, images, all_cands = tiny
    cfg = dataclasses.replace(DistillCfg(batch_size=4), **cfg)
    root = tmp_path / name
    res = distill(s, cands or all_cands, images, cfg, Store(root), root / "d", progress=False)
    weights = {k: distill_mod.load_weights(Store(root), root / "d", *k) for k in res}
    return res, weights


def test_schedule_does_not_change_the_ops(tiny, tmp_path):
    ref, ref_w = _run(tiny, tmp_path, "cached", workers=1)  # auto: 12 images fit the cache
    runs = {
        "paper": _run(tiny, tmp_path, "paper", group_size=1, cache_activations=False),
        "streaming": _run(tiny, tmp_path, "streaming", cache_activations=False, workers=1),
        "threads": _run(tiny, tmp_path, "threads", workers=2),
        "streaming_threads": _run(tiny, tmp_path, "streaming_threads", cache_activations=False,
                                  group_size=2, workers=2),
        "alone": _run(tiny, tmp_path, "alone", cands={1: ["cb_bottle_3x3_ex0.125"]}),
    }
    assert len(ref) == 6 and all(r.status == "ok" for r in ref.values())
    for name, (res, weights) in runs.items():
        for key, r in res.items():
            assert r.loss == pytest.approx(ref[key].loss, rel=1e-5), (name, key)
            for p, t in weights[key].items():
                assert torch.allclose(t, ref_w[key][p], rtol=1e-5, atol=1e-6), (name, key, p)
    info = json.loads((tmp_path / "paper" / "d" / "last_run.json").read_text())
    assert info["world_size"] == 1 and info["ranks"][0]["trained"] == 6
    assert info["ranks"][0]["schedule"] == "streaming" and info["ranks"][0]["group_size"] == 1


def test_augmented_views_do_not_depend_on_the_schedule(tiny, tmp_path):
    """Files streamed through timm's train transform, two epochs of new views: the cache (one
    copy per epoch), streaming and threads train the same weights, and they differ from
    training on the eval view (augmentation was really used)."""
    from timm.data import create_transform

    from compressor.data import ImagePart, scan_images

    s, _, _ = tiny
    root = make_images(tmp_path / "imgs", 10, size=72)
    part = ImagePart(scan_images(root), range(10), create_transform(64),
                     create_transform(64, is_training=True, scale=(0.25, 1.0)), workers=0)
    files = (s, part, {i: ["teacher", *OPS] for i in range(2)})
    ref, ref_w = _run(files, tmp_path, "cached", epochs=2, augment=True, workers=1)
    info = json.loads((tmp_path / "cached" / "d" / "last_run.json").read_text())
    assert info["ranks"][0]["schedule"] == "cached" and info["ranks"][0]["augment"] is True
    others = {
        "streaming": _run(files, tmp_path, "streaming", epochs=2, augment=True,
                          cache_activations=False, group_size=1, workers=1),
        "threads": _run(files, tmp_path, "threads", epochs=2, augment=True, workers=2),
    }
    for name, (res, weights) in others.items():
        for key, r in res.items():
            assert r.loss == pytest.approx(ref[key].loss, rel=1e-5), (name, key)
            for p, t in weights[key].items():
                assert torch.allclose(t, ref_w[key][p], rtol=1e-5, atol=1e-6), (name, key, p)
    _, plain_w = _run(files, tmp_path, "plain", epochs=2, augment=False, workers=1)
    key = (0, OPS[0])
    assert any(not torch.allclose(t, plain_w[key][p]) for p, t in ref_w[key].items())


def test_op_seed_is_stable():
    assert op_seed(3, "identity") == op_seed(3, "identity") == 6444864089766474081
    assert len({op_seed(i, op) for i in range(4) for op in OPS}) == 8
    assert op_seed(0, OPS[0], seed=1) != op_seed(0, OPS[0])


def test_auto_group_size_follows_memory(tiny):
    s, images, cands = tiny
    pending = [(i, op) for i in cands for op in OPS]
    acts = distill_mod.teacher_activations(s, images.x[:1])
    cfg = DistillCfg(batch_size=4)
    dev = torch.device("cpu")
    assert auto_group_size(s, pending, acts, cfg, dev, budget=1 << 40, bs=4) == len(OPS)
    assert auto_group_size(s, pending, acts, cfg, dev, budget=1, bs=4) == 1
    assert _parallel.available_bytes(dev) > 0


def test_memory_decides_the_cache(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(_parallel, "available_bytes", lambda device: 1 << 20)  # 1 MiB free
    res, _ = _run(tiny, tmp_path, "small", cands={0: OPS})
    info = json.loads((tmp_path / "small" / "d" / "last_run.json").read_text())["ranks"][0]
    assert info["schedule"] == "streaming" and info["group_size"] == 1 and len(res) == 2


def test_resume_is_per_op_and_a_diverging_op_fails_alone(tiny, tmp_path, monkeypatch):
    real_step = distill_mod._OpTrainer.step
    calls = {"n": 0}

    def interrupt(self, *args, **kw):
        calls["n"] += 1
        if calls["n"] == 8:  # 3 steps per op: two ops are done and saved
            raise KeyboardInterrupt
        return real_step(self, *args, **kw)

    monkeypatch.setattr(distill_mod._OpTrainer, "step", interrupt)
    with pytest.raises(KeyboardInterrupt):
        _run(tiny, tmp_path, "resume", workers=1)
    assert len(list((tmp_path / "resume" / "d").glob("*/*.json"))) == 2
    monkeypatch.setattr(distill_mod._OpTrainer, "step", real_step)
    trained = []
    real_init = distill_mod._OpTrainer.__init__

    def record(self, split, layer, op, ctx):
        trained.append((layer, op))
        real_init(self, split, layer, op, ctx)

    monkeypatch.setattr(distill_mod._OpTrainer, "__init__", record)
    res, _ = _run(tiny, tmp_path, "resume")
    assert len(res) == 6 and len(trained) == 4

    trained.clear()
    res, _ = _run(tiny, tmp_path, "diverge", cands={0: OPS}, lr=1e12, momentum=0.0)
    failed = [r for r in res.values() if r.status == "failed"]
    assert failed and all("non-finite loss" in r.reason for r in failed)
    assert len(res) == 2 and len(trained) == 2


def test_adding_ops_trains_only_the_new_ones(tiny, tmp_path):
    first, first_w = _run(tiny, tmp_path, "grow", cands={0: ["teacher", OPS[0]]})
    assert set(first) == {(0, OPS[0])}
    both, both_w = _run(tiny, tmp_path, "grow", cands={0: ["teacher", *OPS], 1: [OPS[1]]})
    info = json.loads((tmp_path / "grow" / "d" / "last_run.json").read_text())["ranks"][0]
    assert info["trained"] == 2 and set(both) == {(0, OPS[0]), (0, OPS[1]), (1, OPS[1])}
    assert both[(0, OPS[0])].loss == first[(0, OPS[0])].loss
    assert all(torch.equal(t, first_w[(0, OPS[0])][k]) for k, t in both_w[(0, OPS[0])].items())


def test_recipe_checks_the_schedule_fields(tmp_path):
    from compressor import RecipeError

    for text, match in [("distill:\n  group_size: many", "group_size"),
                        ("distill:\n  cache_activations: maybe", "cache_activations"),
                        ("runtime:\n  amp: 3", "amp"), ("runtime:\n  device: tpu", "device"),
                        ("distill:\n  workers: 0", "workers"),
                        ("distill:\n  device: cpu", "distill.device is now runtime.device"),
                        ("runtime:\n  loader_workers: -1", "loader_workers")]:
        p = tmp_path / "r.yaml"
        p.write_text(text + "\n")
        with pytest.raises(RecipeError, match=match):
            load_recipe(str(p))
    r = load_recipe("default")
    d = r.distill
    assert d.group_size == "auto" and d.cache_activations == "auto" and r.runtime.amp == "auto"
    # the schedule is not part of what the weights are keyed by
    assert "group_size" not in d.result_dict() and "lr" in d.result_dict()
    from compressor.runtime import resolve_runtime

    cpu = resolve_runtime(dataclasses.replace(r.runtime, device="cpu", amp=True))
    assert cpu.amp is None and cpu.device.type == "cpu"  # autocast is for CUDA


def test_two_torchrun_processes_give_the_single_process_pool(tmp_path):
    data = make_images(tmp_path / "images", 10)
    torch.manual_seed(0)
    ckpt = tmp_path / "teacher.safetensors"
    save_file(timm.create_model("test_efficientnet").state_dict(), str(ckpt))
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text("base: default\npool:\n  include: [" + ", ".join(OPS) + "]\n"
                      "distill:\n  batch_size: 2\n")
    args = ["distill", "test_efficientnet", "--data", str(data), "--checkpoint", str(ckpt),
            "--recipe", str(recipe), "--quiet"]
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "compressor", *args, "--work-dir", str(tmp_path / "ranks")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("distilled ") == 1  # rank 0 speaks for both

    from compressor import pipeline

    run = compressor.prepare("test_efficientnet", data, "cpu", 0.5, checkpoint=ckpt,
                             recipe=str(recipe), work_dir=tmp_path / "single", progress=False)
    pool = pipeline.distill_step(run, pipeline.lut_step(run))  # one thread, like each rank
    single = pool.results
    root = tmp_path / "ranks" / pool.root.relative_to(tmp_path / "single")
    info = json.loads((root / "last_run.json").read_text())
    assert info["world_size"] == 2
    # with the LUT not built yet the ranks train every candidate (the ranks cannot share one
    # measurement); the single process measured the LUT and skipped the slower ops
    total = sum(r["trained"] for r in info["ranks"])
    assert total >= len(single)
    assert [r["trained"] for r in info["ranks"]] == [(total + 1) // 2, total // 2]
    for (i, op), r in single.items():
        other = json.loads((root / f"{i:03d}" / f"{op}.json").read_text())
        assert other["status"] == r.status == "ok"
        assert other["loss"] == pytest.approx(r.loss, rel=1e-4, abs=1e-6), (i, op)


def test_an_op_that_changes_its_input_in_place_is_refused_from_the_cache(tiny, tmp_path):
    import ops_pool
    from compressor import DistillError

    @ops_pool.register("inplace_relu_test", accepts=lambda i, o: ops_pool.conv_stride(i, o) == 2)
    def _build(in_shape, out_shape):
        return torch.nn.Sequential(torch.nn.ReLU(inplace=True),
                                   torch.nn.Conv2d(in_shape[0], out_shape[0], 1, stride=2))

    try:
        s, _, _ = tiny
        i = next(i for i, layer in enumerate(s.layers)
                 if "inplace_relu_test" in ops_pool.valid_ops(layer.in_shape, layer.out_shape))
        with pytest.raises(DistillError, match="changed its input in place"):
            _run(tiny, tmp_path, "inplace", cands={i: ["inplace_relu_test"]})
        res, _ = _run(tiny, tmp_path, "inplace_stream", cands={i: ["inplace_relu_test"]},
                      cache_activations=False)
        assert res[(i, "inplace_relu_test")].status == "ok"
    finally:
        ops_pool.unregister("inplace_relu_test")


def test_a_first_batch_of_unreadable_files_gives_the_same_ops_in_every_schedule(tiny, tmp_path):
    """The per-layer loss scale comes from the first batch that has images, in the cached and
    the streaming schedule alike; no op fails for lack of a first batch."""
    from timm.data import create_transform

    from compressor.data import ImagePart, scan_images

    s, _, _ = tiny
    root = make_images(tmp_path / "imgs", 12, size=72)
    images = scan_images(root)
    first = distill_mod._batches(12, 4, 1, 0)[0][2].tolist()  # the first batch's positions
    for p in first:
        images.paths[p].write_bytes(b"")
    part = ImagePart(images, range(12), create_transform(64),
                     create_transform(64, is_training=True, scale=(0.25, 1.0)))
    files = (s, part, {1: ["teacher", OPS[0]]})
    cached, _ = _run(files, tmp_path, "cached", workers=1)
    streaming, _ = _run(files, tmp_path, "streaming", cache_activations=False, workers=1)
    key = (1, OPS[0])
    assert cached[key].status == streaming[key].status == "ok"
    assert cached[key].loss == pytest.approx(streaming[key].loss, rel=1e-5)
    assert len(part.skipped) == 4
