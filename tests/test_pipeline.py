"""The pipeline from Python on a user's own module (a timm test model, random weights) and
synthetic images; the output folder round trip through timm; artifact reuse and resume."""

import copy
import dataclasses
import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest
import timm
import torch

import compressor
import latency_luts
from compressor import distill as distill_mod
from compressor import pipeline, selection


@pytest.fixture(scope="module")
def run_result(tmp_path_factory):
    from compressor.recipe import load_recipe

    from .conftest import make_images

    root = tmp_path_factory.mktemp("pipe")
    data = make_images(root / "images", 40)
    recipe = load_recipe("default")
    recipe = recipe.override("pool", include=["identity", "efn_3x3_e1_se1.00",
                                              "cb_bottle_3x3_ex0.125"])
    recipe = recipe.override("distill", epochs=1, batch_size=8, group_size=1)
    # one search round: the measured latency (noisy on a shared machine) must not change the
    # choice between runs that should reuse each other's artifacts
    recipe = recipe.override("search", k=4, verify_rounds=1)
    recipe = recipe.override("finetune", epochs=1, batch_size=8)
    recipe = recipe.override("data", candidate_eval_images=8, batch_size=8)
    torch.manual_seed(0)
    teacher = timm.create_model("test_efficientnet").eval()
    kwargs = dict(recipe=recipe, work_dir=root / "work", progress=False)
    result = compressor.compress(teacher, data, "cpu", 0.6, **kwargs)
    return {"root": root, "data": data, "teacher": teacher, "kwargs": kwargs,
            "result": result}


def test_report_fields(run_result):
    r = run_result["result"].report
    for key in ("predicted", "measured"):
        assert r["teacher"]["latency_ms"][key] > 0
        assert r["student"]["latency_ms"][key] > 0
    assert r["speedup"]["requested"] == 0.6
    assert r["speedup"]["predicted"] <= 0.6 + 1e-9
    # the measured speedup is the median ratio of pairs timed in alternation; the two medians'
    # ratio agrees with it up to the machine's drift between rounds
    assert r["speedup"]["measured"] == pytest.approx(
        r["student"]["latency_ms"]["measured"] / r["teacher"]["latency_ms"]["measured"],
        rel=0.15)
    assert r["eval_images"] == 10 and r["data"] == {"distill": 24, "search": 6, "eval": 10,
                                                    "skipped": 0, "skipped_files": []}
    assert 0 <= r["student"]["agreement"] <= 100
    assert 0 <= r["teacher"]["top1"] <= 100
    assert len(r["student"]["choices"]) == len(r["layers"])
    for phase in ("split", "lut", "distill", "fitness", "search", "finetune", "evaluate"):
        assert r["phases"][phase]["seconds"] >= 0
    assert r["search"]["rounds"][0]["solutions"]
    # what layers.png and the model card read
    lat = r["layer_latency_ms"]
    assert len(lat["teacher"]) == len(lat["student"]) == len(r["layers"])
    assert lat["stem"] + lat["head"] + sum(lat["student"]) == pytest.approx(
        r["student"]["latency_ms"]["predicted"])
    assert lat["stem"] + lat["head"] + sum(lat["teacher"]) == pytest.approx(
        r["teacher"]["latency_ms"]["predicted"])
    cx = r["complexity"]
    teacher = run_result["teacher"]
    assert cx["teacher"]["params_m"] == round(sum(p.numel() for p in teacher.parameters()) / 1e6,
                                              6)
    from compressor.complexity import complexity

    student = run_result["result"].model
    assert cx["student"] == complexity(student, run_result["result"].input_size)
    assert 0 < cx["student"]["gmacs"] and 0 < cx["teacher"]["gmacs"]
    assert cx["input_size"] == list(run_result["result"].input_size)
    # a user's own module: its weights are its own, so no Hub base model is claimed
    assert r["sources"] == {"teacher": {"weights": "module", "hub_id": None, "datasets": [],
                                        "license": None},
                            "data": "images", "val_data": None}


def test_save_and_load_round_trip(run_result, tmp_path):
    result = run_result["result"]
    out = result.save_pretrained(tmp_path / "out")
    names = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.rglob("*")}
    assert modes["model.safetensors"] == 0o644 and set(modes.values()) <= {0o644, 0o755}
    assert {"model.safetensors", "config.json", "README.md", "onnx/model.onnx",
            "report.json"} <= names
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architecture"] == "hant_transformed"
    x = torch.randn(2, *result.input_size)
    with torch.no_grad():
        ref = result.model.eval()(x)
        # the teacher here is a module timm knows by its pretrained_cfg architecture
        via_timm = timm.create_model(f"local-dir:{out}", pretrained=True).eval()(x)
        via_load = compressor.load(out)(x)
    assert torch.allclose(ref, via_timm, atol=1e-5)
    assert torch.allclose(ref, via_load, atol=1e-5)
    sess = ort.InferenceSession(str(out / "onnx" / "model.onnx"))
    (y,) = sess.run(None, {"pixel_values": x.numpy()})
    assert np.allclose(y, ref.numpy(), atol=1e-4)
    card = (out / "README.md").read_text()
    assert "hant_transformed" not in card or "timm.create_model" in card
    assert f"{result.report['eval_images']} held-out images" in card


def test_second_run_reuses_artifacts(run_result):
    d = run_result
    result = compressor.compress(d["teacher"], d["data"], "cpu", 0.6, **d["kwargs"])
    ph = result.report["phases"]
    assert ph["lut"]["cached"] and ph["fitness"]["cached"] and ph["finetune"]["cached"]
    assert ph["distill"]["seconds"] < 2.0
    assert result.report["student"]["choices"] == d["result"].report["student"]["choices"]


def test_interrupted_distillation_resumes(run_result, monkeypatch):
    d = run_result
    work = d["root"] / "work2"
    shutil.rmtree(work, ignore_errors=True)
    kwargs = dict(d["kwargs"], work_dir=work)
    real = distill_mod._train_group
    calls = {"n": 0}

    def interrupt_after_first(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(distill_mod, "_train_group", interrupt_after_first)
    run = compressor.prepare(d["teacher"], d["data"], "cpu", 0.6, **kwargs)
    lat = pipeline.lut_step(run)
    with pytest.raises(KeyboardInterrupt):
        pipeline.distill_step(run, lat)
    saved = list(work.rglob("distill/*/*/*.json"))
    assert saved  # the first group is on disk
    trained = []

    def record(split, group, *args, **kw):
        trained.extend(group)
        return real(split, group, *args, **kw)

    monkeypatch.setattr(distill_mod, "_train_group", record)
    run2 = compressor.prepare(d["teacher"], d["data"], "cpu", 0.6, **kwargs)
    res = pipeline.distill_step(run2, pipeline.lut_step(run2)).results
    assert len(trained) == len(res) - len(saved)  # only what was missing was trained
    assert not list(work.rglob("*.tmp"))  # no half-written artifact


def test_speedup_list_writes_a_front_and_nsga2_runs(run_result, tmp_path):
    d = run_result
    recipe = d["kwargs"]["recipe"].override("search", method="nsga2", pop_size=16,
                                              generations=10)
    kwargs = dict(d["kwargs"], recipe=recipe)
    result = compressor.compress(d["teacher"], d["data"], "cpu", [0.6, 0.8, 0.02],
                                 output=tmp_path / "out", **kwargs)
    front = result.report["front"]
    sp = [p["speedup_requested"] for p in front["points"]]
    assert sp == [0.6, 0.8, 0.02]
    assert front["points"][0]["choices"] == result.report["student"]["choices"]
    assert front["points"][1]["latency_ms"] <= 0.8 * front["teacher"]["latency_ms"] + 1e-9
    assert front["points"][2]["loss"] is None and "budget" in front["points"][2]["error"]
    assert result.report["phases"]["search"]["method"] == "nsga2"
    for name in ("front.png", "front.csv", "front.md"):
        assert (tmp_path / "out" / name).is_file()
    assert (tmp_path / "out" / "front.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gpu_target_runs_anywhere_on_estimates(run_result):
    d = run_result
    # on a V100 at batch 128 the tiny model's stem and head dominate: 0.9 is reachable
    result = compressor.compress(d["teacher"], d["data"], "v100", 0.9, **d["kwargs"])
    r = result.report
    assert r["target"]["name"] == "v100" and r["target"]["estimated"] is True
    assert r["phases"]["lut"]["estimated"] is True
    assert r["speedup"]["measured"] is None and r["student"]["latency_ms"]["measured"] is None
    assert r["speedup"]["predicted"] <= 0.9 + 1e-9
    assert any("roofline estimates" in n for n in r["notes"])


def test_nsr_loss_and_donnav2_filter_in_a_run(run_result):
    d = run_result
    recipe = d["kwargs"]["recipe"].override("distill", loss="nsr")
    recipe = recipe.override("fitness", donnav2_filter=True)
    result = compressor.compress(d["teacher"], d["data"], "cpu", 0.6,
                                 **dict(d["kwargs"], recipe=recipe))
    r = result.report
    assert r["recipe"]["distill"]["loss"] == "nsr"
    # a new distillation (the loss is part of the artifact key), beside the MSE one
    assert len([p for p in (d["root"] / "work").glob("*/distill/*") if p.is_dir()]) >= 2
    pre = r["phases"]["search"]["prefilter"]
    assert pre["removed_dominated_donnav2"] >= 0
    assert pre["kept"] == pre["candidates"] - pre["removed_slower_than_teacher"] - pre[
        "removed_failed_distillation"] - pre["removed_dominated_donnav2"] - pre[
        "removed_accuracy_drop"]


def test_repvgg_student_is_fused_for_export_latency_and_loading(run_result, tmp_path):
    """A student with multi-branch repvgg ops is saved trainable and fused (re-parameterized)
    for ONNX export, latency measurement and `compressor.load`, with the same outputs."""
    from compressor import publish
    from compressor.latency import _deploy
    from compressor.split import TEACHER, split

    result = run_result["result"]
    s = split(run_result["teacher"].eval(), input_size=result.input_size)
    choices = [TEACHER] * len(s.layers)
    import ops_pool

    i = next(i for i, layer in enumerate(s.layers)
             if "repvgg_3x3_ex1.0" in ops_pool.valid_ops(layer.in_shape, layer.out_shape))
    choices[i] = "repvgg_3x3_ex1.0"
    model = s.assemble(choices).train()
    with torch.no_grad():  # non-trivial BN statistics, non-zero last norms
        for p in model.layers[i].parameters():
            p.add_(0.1 * torch.randn_like(p))
        for _ in range(3):
            model(torch.randn(4, *result.input_size))
    model.eval()
    n_branchy = sum(isinstance(m, torch.nn.Conv2d) for m in model.layers[i].modules())
    fused = _deploy(model)
    assert sum(isinstance(m, torch.nn.Conv2d) for m in fused.layers[i].modules()) < n_branchy
    assert sum(isinstance(m, torch.nn.Conv2d) for m in model.layers[i].modules()) == n_branchy
    out = publish.save_pretrained(model, tmp_path / "rep", teacher_name=result.teacher_name,
                                  teacher_args=result.teacher_args, choices=choices,
                                  input_size=result.input_size, report=result.report)
    x = torch.randn(2, *result.input_size)
    with torch.no_grad():
        ref = model(x)
        loaded = compressor.load(out)
        trainable = compressor.load(out, fuse=False)
        assert torch.allclose(fused(x), ref, atol=1e-4)
        assert torch.allclose(loaded(x), ref, atol=1e-4)
        assert torch.allclose(trainable(x), ref, atol=1e-5)
    assert set(trainable.state_dict()) == set(model.state_dict())
    assert set(loaded.state_dict()) != set(model.state_dict())
    import onnx

    graph = onnx.load(str(out / "onnx" / "model.onnx")).graph
    assert sum(n.op_type == "Conv" for n in graph.node) == sum(
        isinstance(m, torch.nn.Conv2d) for m in fused.modules())  # the fused form is exported
    sess = ort.InferenceSession(str(out / "onnx" / "model.onnx"))
    (y,) = sess.run(None, {"pixel_values": x.numpy()})
    assert np.allclose(y, ref.numpy(), atol=1e-4)


def test_nsga2_with_hardware_in_the_loop(run_result):
    """DONNA's hardware in the loop: NSGA-II's latency objective is measured end to end when the
    target's hardware is here (cpu), and falls back to the LUT, with a note, when it is not."""
    d = run_result
    recipe = d["kwargs"]["recipe"].override("search", method="nsga2", pop_size=4, generations=2,
                                              hardware_in_loop=True, k=2, verify_rounds=1)
    kwargs = dict(d["kwargs"], recipe=recipe)
    result = compressor.compress(d["teacher"], d["data"], "cpu", 0.6, **kwargs)
    search = result.report["phases"]["search"]
    assert search["method"] == "nsga2" and search["architectures_measured_in_loop"] >= 4
    assert not any("hardware_in_loop" in n for n in result.report["notes"])
    result = compressor.compress(d["teacher"], d["data"], "v100", 0.9, **kwargs)
    assert "architectures_measured_in_loop" not in result.report["phases"]["search"]
    assert any("hardware_in_loop" in n and "LUT" in n for n in result.report["notes"])


def test_channel_divisor_travels_with_the_model_and_keys(run_result, tmp_path):
    """Ops built under another channel divisor have other widths under the same names: the LUT
    key says so, and a saved model rebuilds with its own divisor."""
    import ops_pool
    from compressor import publish
    from compressor.latency import op_key
    from compressor.split import TEACHER, split

    result = run_result["result"]
    s = split(run_result["teacher"].eval(), input_size=result.input_size)
    op = "cb_bottle_3x3_ex0.125"
    i = next(i for i, layer in enumerate(s.layers)
             if op in ops_pool.valid_ops(layer.in_shape, layer.out_shape))
    choices = [TEACHER] * len(s.layers)
    choices[i] = op
    with ops_pool.channel_divisor(16):
        model = s.assemble(choices).eval()
        assert op_key(s, "arch", i, op) == f"{op}@div16"
    assert op_key(s, "arch", i, op) == op
    assert model.layers[i].state_dict()["0.weight"].shape[0] == 16  # 8 under the default
    out = publish.save_pretrained(model, tmp_path / "div16", teacher_name=result.teacher_name,
                                  teacher_args=result.teacher_args, choices=choices,
                                  input_size=result.input_size, report=result.report, onnx=False)
    x = torch.randn(2, *result.input_size)
    with torch.no_grad():
        ref = model(x)
        reloaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
        assert reloaded.channel_divisor == 16  # so that saving it again records 16
        assert torch.allclose(reloaded(x), ref, atol=1e-5)
        assert torch.allclose(compressor.load(out)(x), ref, atol=1e-5)


def test_recipe_search_gap_and_total_time_reach_the_solver(run_result, monkeypatch):
    """search.gap and search.total_time_limit go to the integer program, and every solution in
    the report says what was proven (status, bound, gap, nodes)."""

    d = run_result
    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return real(*args, **kwargs)

    real = selection.solve
    monkeypatch.setattr(selection, "solve", spy)
    recipe = d["kwargs"]["recipe"].override("search", gap=0.2, total_time_limit=30.0,
                                              verify_rounds=1)
    run = compressor.prepare(d["teacher"], d["data"], "cpu", 0.6,
                             **dict(d["kwargs"], recipe=recipe))
    lat = pipeline.lut_step(run)
    pool = pipeline.distill_step(run, lat)
    sel = pipeline.search_step(run, lat, pool, pipeline.fitness_step(run, pool))
    assert seen and all(kw["gap"] == 0.2 and kw["total_time_limit"] == 30.0 for kw in seen)
    sols = sel.rounds[-1]["solutions"]  # what the report lists under search.rounds
    for s in sols:
        assert s["status"] in ("optimal", "feasible")
        assert s["bound"] is not None and s["bound"] <= s["objective"] + 1e-12
        assert 0.0 <= s["gap"] <= 0.2 + 1e-9 and isinstance(s["nodes"], int)


def test_unusable_solver_fails_before_any_work(run_result, monkeypatch, tmp_path):
    """A recipe naming a solver that cannot run stops the run at once (not after distillation)."""
    import sys

    from compressor import SearchError

    d = run_result
    monkeypatch.setitem(sys.modules, "gurobipy", None)  # as if not installed
    for solver, message in (("gurobi", "needs gurobipy"), ("NO_SUCH_SOLVER", "not available")):
        recipe = d["kwargs"]["recipe"].override("search", solver=solver)
        with pytest.raises(SearchError, match=message):
            compressor.prepare(d["teacher"], d["data"], "cpu", 0.6,
                           **dict(d["kwargs"], recipe=recipe, work_dir=tmp_path / "w"))
        assert not (tmp_path / "w").exists() or not any((tmp_path / "w").rglob("*.json"))


def test_hant_distill_then_compress_trains_what_compress_alone_trains(run_result, tmp_path,
                                                                      monkeypatch):
    """`hant distill` first, then `compress` on the same work dir: compress trains nothing
    more, and alone (a fresh work dir) it trains exactly the ops `hant distill` trained."""
    from click.testing import CliRunner

    from compressor.cli import hant

    d = run_result
    ckpt = tmp_path / "teacher.safetensors"
    from safetensors.torch import save_file

    save_file(d["teacher"].state_dict(), str(ckpt))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("base: default\npool:\n  include: [identity, efn_3x3_e1_se1.00, "
                      "cb_bottle_3x3_ex0.125]\ndistill:\n  batch_size: 8\n"
                      "search:\n  k: 2\nfinetune:\n  epochs: 1\n  batch_size: 8\n"
                      "data:\n  candidate_eval_images: 8\n  batch_size: 8\n")
    trained = []
    real = distill_mod._train_group

    def record(split, group, *args, **kw):
        trained.extend(group)
        return real(split, group, *args, **kw)

    monkeypatch.setattr(distill_mod, "_train_group", record)
    common = ["test_efficientnet", "--data", str(d["data"]), "--checkpoint", str(ckpt),
              "--recipe", str(recipe), "--speedup", "0.6", "--quiet"]
    res = CliRunner().invoke(hant, ["distill", *common, "--work-dir", str(tmp_path / "a")])
    assert res.exit_code == 0, res.output
    by_hant = sorted(trained)
    assert by_hant
    trained.clear()
    run = compressor.prepare("test_efficientnet", d["data"], "cpu", 0.6, checkpoint=ckpt,
                             recipe=str(recipe), work_dir=tmp_path / "a", progress=False)
    pipeline.run_all(run)
    assert trained == []  # compress after hant distill: nothing left to train
    compressor.compress("test_efficientnet", d["data"], "cpu", 0.6, checkpoint=ckpt,
                        recipe=str(recipe), work_dir=tmp_path / "b", progress=False)
    assert sorted(trained) == by_hant  # compress alone trains the same ops


def test_each_phase_runs_alone_from_its_inputs(run_result, tmp_path):
    """Every step takes what it needs and nothing else: an artifact made by one run feeds the
    next step of another run (same inputs, fresh state), and the fitness table comes back from
    the work dir instead of being recomputed."""
    d = run_result
    kwargs = dict(d["kwargs"], work_dir=tmp_path / "w")
    first = compressor.prepare(d["teacher"], d["data"], "cpu", 0.6, **kwargs)
    lat = pipeline.lut_step(first)
    assert lat.teacher_ms > lat.min_ms > 0 and lat.budget(0.6) > 0
    pool = pipeline.distill_step(first, lat)
    assert pool.results and all(r.status == "ok" for r in pool.results.values())
    second = compressor.prepare(d["teacher"], d["data"], "cpu", 0.6, **kwargs)
    fit = pipeline.fitness_step(second, pool)
    assert second.phases["fitness"]["cached"] is False
    again = pipeline.fitness_step(compressor.prepare(d["teacher"], d["data"], "cpu", 0.6,
                                                     **kwargs), pool)
    assert again == fit
    sel = pipeline.search_step(second, lat, pool, fit)
    assert sel.best.latency_ms + lat.fixed_ms <= 0.6 * lat.teacher_ms + 1e-9
    student = pipeline.finetune_step(second, pool, sel.best.choices)
    assert student.record["epochs"] == 1 and len(student.record["history"]) == 1
    assert "search_loss" in student.record["history"][0]  # the search part, every epoch
    scores = pipeline.evaluate_step(second, student.model)
    assert scores["student"]["images"] == len(second.parts["eval"])
    report = pipeline.build_report(second, lat, pool, sel, scores)
    assert report["student"]["choices"] == list(sel.best.choices)


def test_unreadable_files_are_counted_on_a_cached_rerun_too(run_result, tmp_path):
    """Files are found unreadable only when a part is read; a rerun whose phases are all cached
    reads few images, yet reports the same skipped files (kept in the work dir)."""
    d = run_result
    data = tmp_path / "imgs"
    shutil.copytree(d["data"], data)
    (data / "n01440764" / "broken.jpg").write_bytes(b"not a jpeg")
    kwargs = dict(d["kwargs"], work_dir=tmp_path / "w")
    first = compressor.compress(d["teacher"], data, "cpu", 0.6, **kwargs).report["data"]
    again = compressor.compress(d["teacher"], data, "cpu", 0.6, **kwargs).report
    assert first["skipped"] == again["data"]["skipped"] == 1
    assert "broken.jpg" in again["data"]["skipped_files"][0]
    assert again["phases"]["fitness"]["cached"] and again["phases"]["finetune"]["cached"]


@pytest.mark.parametrize("student_ms, chosen", [
    ([4.0, 7.0], 0),  # slack (0.4 for 0.6): loosened; the looser one misses: the first is kept
    ([4.0, 6.1], 1),  # loosened, and the second meets the request within the tolerance
    ([7.0, 6.0], 1),  # a miss tightens; the second meets it
])
def test_verify_rounds_tighten_a_miss_and_loosen_slack(run_result, monkeypatch, student_ms,
                                                       chosen):
    from compressor.latency import Measurer

    d = run_result
    times = iter(student_ms)
    budgets = []
    real_rank = selection._Ranker.__call__

    def rank(self, a, b, budget):
        budgets.append(budget)
        return real_rank(self, a, b, budget)

    monkeypatch.setattr(selection._Ranker, "__call__", rank)
    def paired(self, model):
        ms = next(times)
        return latency_luts.PairedMeasurement(10.0, ms, ms / 10.0, 0.0, 5)

    monkeypatch.setattr(Measurer, "paired", paired)
    recipe = d["kwargs"]["recipe"].override("search", verify_rounds=2)
    run = compressor.prepare(d["teacher"], d["data"], "cpu", 0.6,
                             **dict(d["kwargs"], recipe=recipe))
    lat = pipeline.lut_step(run)
    pool = pipeline.distill_step(run, lat)
    sel = pipeline.search_step(run, lat, pool, pipeline.fitness_step(run, pool))
    assert len(sel.rounds) == 2 and sel.chosen_round == chosen
    assert sel.measured_ms == student_ms[chosen] and sel.teacher_measured_ms == 10.0
    assert sel.measured_speedup == student_ms[chosen] / 10.0
    r = sel.rounds[chosen]
    assert sel.best.choices == r["solutions"][r["best"]]["choices"]
    first = student_ms[0] / 10.0
    assert budgets[1] == pytest.approx(budgets[0] * 0.6 / first)  # towards the measured ratio


def test_in_context_fitness_is_the_fitness_table_in_the_teachers_context(run_result,
                                                                         monkeypatch):
    """Scored around the all-teacher architecture, on the same images, the in-context fitness
    is the one-at-a-time table (up to a per-layer constant); around another architecture it is
    not; and refine rounds add the solutions found with it to the ranked ones."""
    from compressor.evaluate import predict
    from compressor.fitness import fitness
    from compressor.split import TEACHER

    d = run_result
    run = compressor.prepare(d["teacher"], d["data"], "cpu", 0.6, **d["kwargs"])
    lat = pipeline.lut_step(run)
    pool = pipeline.distill_step(run, lat)
    ops = [[TEACHER] + [op for (i, op) in pool.results if i == layer]
           for layer in range(len(pool.split.layers))]
    images = run.parts["search"].decode()
    t_logits = predict(run.teacher, images)
    n = len(ops)
    ctx = selection.in_context_fitness(pool, [TEACHER] * n, ops, images, t_logits)
    table = fitness(pool.split, {i: {op: pool.split.layers[i].module if op == TEACHER
                                     else pool.op(i, op) for op in layer}
                                 for i, layer in enumerate(ops)}, images)
    for i, layer in enumerate(ops):
        for op in layer:
            assert ctx[i][op] - ctx[i][TEACHER] == pytest.approx(table.a[i][op], abs=1e-5)
        assert min(ctx[i].values()) == 0.0
    other = [layer[1] if len(layer) > 1 else TEACHER for layer in ops]
    around = selection.in_context_fitness(pool, other, ops, images, t_logits)
    assert any(abs((around[i][op] - around[i][TEACHER]) - table.a[i][op]) > 1e-4
               for i, layer in enumerate(ops) for op in layer)

    calls = []

    def spy(pool, choices, *args, **kwargs):
        calls.append(list(choices))
        return real(pool, choices, *args, **kwargs)

    real = selection.in_context_fitness
    monkeypatch.setattr(selection, "in_context_fitness", spy)
    recipe = d["kwargs"]["recipe"].override("search", refine_rounds=1, verify_rounds=1)
    run = compressor.prepare(d["teacher"], d["data"], "cpu", 0.6,
                             **dict(d["kwargs"], recipe=recipe))
    sel = pipeline.search_step(run, lat, pool, pipeline.fitness_step(run, pool))
    first = sel.rounds[0]
    assert len(first["solutions"]) == len(first["candidate_losses"]) >= 1
    assert first["candidate_losses"][first["best"]] == min(first["candidate_losses"])
    choices = [tuple(s["choices"]) for s in first["solutions"]]
    assert len(set(choices)) == len(choices)  # a refine round adds only new architectures
    # one refine round, around the best of the first K
    assert len(calls) == 1 and tuple(calls[0]) in choices[:4]


def test_rerank_picks_among_the_best_after_a_brief_redistillation(run_result, monkeypatch):
    """`search.rerank_top`: the best few by raw loss are re-distilled briefly and scored again;
    the pick is the best of those, and the pool's phase-1 weights are left as they were."""
    from compressor.split import TEACHER

    d = run_result
    recipe = d["kwargs"]["recipe"].override("search", rerank_top=2, rerank_images=8,
                                            rerank_epochs=1)
    run = compressor.prepare(d["teacher"], d["data"], "cpu", 0.6,
                             **dict(d["kwargs"], recipe=recipe))
    lat = pipeline.lut_step(run)
    pool = pipeline.distill_step(run, lat)
    seen = []
    real = selection.redistill

    def spy(student, split, images, cfg, **kwargs):
        seen.append((list(student.choices), len(images), cfg.epochs))
        return real(student, split, images, cfg, **kwargs)

    monkeypatch.setattr(selection, "redistill", spy)
    sel = pipeline.search_step(run, lat, pool, pipeline.fitness_step(run, pool))
    first = sel.rounds[0]
    sols, losses, reranked = first["solutions"], first["candidate_losses"], \
        first["reranked_losses"]
    top2 = sorted(range(len(losses)), key=losses.__getitem__)[:2]
    assert sorted(int(i) for i in reranked) == sorted(top2)
    assert first["best"] == int(min(reranked, key=reranked.get))
    assert [c for c, _, _ in seen] == [sols[i]["choices"] for i in top2]
    assert all(n == 8 and epochs == 1 for _, n, epochs in seen)
    trained = [i for i in top2 if any(c not in (TEACHER, "identity") for c in sols[i]["choices"])]
    assert trained, "the test needs a re-ranked architecture with a trained op"
    # re-distillation moved its loss; the pool's weights, scored again, give the raw loss
    i = trained[0]
    assert reranked[str(i)] != pytest.approx(losses[i], rel=1e-3)
    rank = selection._Ranker(pool, lat, recipe.search, *_cand(run), run.runtime, 0)
    assert rank.loss(sols[i]["choices"]) == pytest.approx(losses[i], rel=1e-5)


def _cand(run):
    from compressor.evaluate import predict

    n = min(run.recipe.data.candidate_eval_images, len(run.parts["search"]))
    cand = run.parts["search"].subset(range(n)).decode()
    return cand, predict(run.teacher, cand, run.runtime)


def test_batchnorm_recalibration_gives_ops_the_statistics_of_eval_view_inputs(run_result,
                                                                             monkeypatch):
    """`fitness.bn_recalibrate_images`: every trained op with BatchNorm gets the running
    statistics of the teacher's activations at its layer's input on that many distill images
    (eval view); the phases after it see them, under their own cache keys; a second run reuses
    the stored statistics."""
    from torch.optim.swa_utils import update_bn

    from compressor.distill import teacher_activations

    d = run_result
    recipe = d["kwargs"]["recipe"].override("fitness", bn_recalibrate_images=8)
    run = compressor.prepare(d["teacher"], d["data"], "cpu", 0.6,
                             **dict(d["kwargs"], recipe=recipe))
    lat = pipeline.lut_step(run)
    pool = pipeline.distill_step(run, lat)
    assert pool.bn_root is not None and pool.key != pool.root.name
    (i, op), = [k for k in sorted(pool.results) if k[1].startswith("efn")][:1]
    x = torch.cat([b.x for b in run.parts["distill"].subset(range(8)).batches(8)])
    raw = pool.split.build_op(i, op)
    raw.load_state_dict(distill_mod.load_weights(pool.store, pool.root, i, op))
    want = copy.deepcopy(raw)
    update_bn([teacher_activations(pool.split, x)[i]], want)
    got = pool.op(i, op).state_dict()
    means = [k for k in got if k.endswith("running_mean")]
    assert means
    for k in means:
        assert torch.allclose(got[k], want.state_dict()[k], atol=1e-5), k
    assert any(not torch.allclose(got[k], raw.state_dict()[k]) for k in means)
    def fail(*args, **kwargs):
        raise AssertionError("the stored statistics should have been reused")

    monkeypatch.setattr(torch.optim.swa_utils, "update_bn", fail)
    again = pipeline.distill_step(run, lat)
    assert again.key == pool.key
    assert torch.equal(again.weights(i, op)[means[0]], got[means[0]])


def test_a_lut_timed_the_old_way_is_measured_again_not_merged(run_result, tmp_path):
    """The LUT step merges what another run measured meanwhile, but never entries that the
    run itself refused (timed the way of an older version): they are measured again."""
    from compressor.store import seal

    d = run_result
    kwargs = dict(d["kwargs"], work_dir=tmp_path / "w")
    run = compressor.prepare(d["teacher"], d["data"], "cpu", 0.6, **kwargs)
    pipeline.lut_step(run)
    old = latency_luts.LUT.load(run.lut_path)
    del old.fingerprint["timing"]  # as an older version wrote it
    for e in old.entries.values():
        e["ms"] = 1000.0  # marks every entry of the old table
    old.save(run.lut_path)
    seal(run.lut_path)
    again = compressor.prepare(d["teacher"], d["data"], "cpu", 0.6, **kwargs)
    lat = pipeline.lut_step(again)
    assert lat.teacher_ms < 1000.0
    disk = latency_luts.LUT.load(again.lut_path)
    assert disk.fingerprint["timing"] == "io-bound"
    assert all(e["ms"] < 1000.0 for e in disk.entries.values())


def test_block_drop_runoff_keeps_the_network_closer_to_the_teacher(run_result, monkeypatch):
    """`search.block_drop_runoff`: after the finetune, block dropping at the pick's latency is
    re-distilled and finetuned too and replaces the student only when its loss on the search
    part is lower and it measures within the request; the student's own phase records stay
    where they were."""
    from types import SimpleNamespace

    from compressor.pipeline import Student
    from compressor.search import Solution

    d = run_result
    # test_resnet: its same-shape blocks can be dropped (test_efficientnet has none)
    recipe = d["kwargs"]["recipe"].override("search", block_drop_runoff=True)
    recipe = recipe.override("pool", include=["identity", "cb_bottle_3x3_ex0.125"])
    torch.manual_seed(0)
    teacher = timm.create_model("test_resnet").eval()
    kwargs = dict(d["kwargs"], recipe=recipe)
    run = compressor.prepare(teacher, d["data"], "cpu", 0.6, **kwargs)
    lat = pipeline.lut_step(run)
    pool = pipeline.distill_step(run, lat)
    fit = pipeline.fitness_step(run, pool)
    sel = pipeline.search_step(run, lat, pool, fit)
    # the pick, fixed: a replaced op where block dropping would drop the first block, timed
    # at 0.8 of the teacher (block dropping reaches that: its first block is ~1/5 of it)
    pick = ["cb_bottle_3x3_ex0.125"] + ["teacher"] * (len(lat.b) - 1)
    sel = dataclasses.replace(sel, best=Solution(pick, 0.0, sel.best.latency_ms, "ip"),
                              rounds=[dict(sel.rounds[-1], measured_speedup=0.8)])
    student = pipeline.finetune_step(run, pool, pick, pipeline.redistill_step(run, pool, pick))
    rec = student.record
    kept = (rec["start_search_loss"] if rec["kept_epoch"] == 0 else
            rec["history"][rec["kept_epoch"] - 1]["search_loss_ema" if rec["kept"] == "ema"
                                                  else "search_loss"])
    assert rec["kept_search_loss"] == kept  # what the runoff compares
    own_finetune = run.phases["finetune"]
    ratio = {"value": 0.55}  # the end-to-end timing, fixed: a shared machine drifts
    monkeypatch.setattr(pipeline.Measurer, "paired", lambda self, model: SimpleNamespace(
        a_ms=10.0, b_ms=10.0 * ratio["value"], ratio=ratio["value"]))
    trained = []
    real = pipeline.finetune_step
    monkeypatch.setattr(pipeline, "finetune_step",
                        lambda r, p, choices, start=None: trained.append(choices)
                        or real(r, p, choices, start))

    bad = copy.deepcopy(student.model)  # far from the teacher
    with torch.no_grad():
        for prm in bad.parameters():
            prm.copy_(torch.randn_like(prm))
    exact = pool.assemble(["teacher"] * len(pick)).eval()  # the teacher itself: loss ~0

    # a student further from the teacher than block dropping: replaced
    sel2, other = pipeline.runoff_step(run, lat, pool, fit, sel, Student(bad, student.record))
    out = dict(run.phases["runoff"])
    assert out.get("skipped") is None, out.get("skipped")
    assert out["kept"] == "block-drop" and trained == [out["choices"]]
    assert set(sel2.best.choices) <= {"teacher", "identity"}
    assert sel2.best.choices != sel.best.choices and sel2.best.choices == out["choices"]
    assert sel2.measured_speedup == 0.55 and sel2.measured_ms == pytest.approx(5.5)
    assert other.model is not student.model
    assert run.phases["finetune"] is own_finetune and "finetune" in out  # its own, apart
    report = pipeline.build_report(run, lat, pool, sel2, pipeline.evaluate_step(run, other.model))
    assert report["student"]["choices"] == out["choices"]
    assert report["speedup"]["measured"] == 0.55 and report["search"]["runoff"]["search_loss"] \
        == out["block_drop_search_loss"]
    assert any("block dropping" in n for n in run.notes)
    # a student closer to the teacher: kept (the block-dropped network's finetune is cached)
    sel3, same = pipeline.runoff_step(run, lat, pool, fit, sel, Student(exact, {}))
    assert run.phases["runoff"]["kept"] == "student" and sel3 is sel and same.model is exact
    assert run.phases["runoff"]["student_search_loss"] < 1e-6 < out["student_search_loss"]
    # the cached finetune: the same weights, and its record came back with them
    again = run.phases["runoff"]
    assert again["block_drop_search_loss"] == out["block_drop_search_loss"]
    assert again["finetune"]["cached"] is True and out["finetune"]["cached"] is False
    assert again["finetune"]["kept"] == out["finetune"]["kept"] is not None
    # block dropping that measures slower than asked is not trained at all
    ratio["value"], trained[:] = 0.6 + recipe.search.tolerance + 0.05, []
    sel4, same = pipeline.runoff_step(run, lat, pool, fit, sel, Student(bad, {}))
    assert sel4 is sel and not trained and "slower than" in run.phases["runoff"]["skipped"]
    # off (the default): nothing happens
    off = compressor.prepare(teacher, d["data"], "cpu", 0.6,
                             **dict(kwargs, recipe=recipe.override("search",
                                                                   block_drop_runoff=False)))
    assert pipeline.runoff_step(off, lat, pool, fit, sel, student) == (sel, student)
    assert "runoff" not in off.phases
