"""Re-distillation of the chosen architecture on its own inputs."""

import copy

import pytest
import timm
import torch
from timm.data import create_transform

import compressor
import ops_pool
from compressor.data import ImagePart, scan_images
from compressor.distill import distill, load_weights, teacher_activations
from compressor.recipe import DistillCfg, RecipeError, RedistillCfg, load_recipe
from compressor.redistill import redistill
from compressor.store import Store

from .conftest import make_images


def _chained(tmp_path, replaced):
    """test_efficientnet split, `replaced` layers distilled on the teacher's inputs (phase 1);
    returns (split, choices, part, weights, error(student)) where error is the normalised MSE
    of the student's last features against the teacher's, eval view."""
    torch.manual_seed(0)
    teacher = timm.create_model("test_efficientnet").eval()
    s = compressor.split(teacher, input_size=(3, 48, 48))
    choices = ["teacher"] * len(s.layers)
    for i in replaced:
        choices[i] = ops_pool.valid_ops(s.layers[i].in_shape, s.layers[i].out_shape)[0]
    root = make_images(tmp_path / "imgs", 32, size=56)
    part = ImagePart(scan_images(root), range(32), create_transform(48),
                     create_transform(48, is_training=True, scale=(0.25, 1.0)))
    store = Store(tmp_path / "w")
    distill(s, {i: [choices[i]] for i in replaced}, part,
            DistillCfg(optimizer="adam", lr=0.01, epochs=5, batch_size=8), store,
            tmp_path / "w" / "d", progress=False)
    weights = {i: load_weights(store, tmp_path / "w" / "d", i, choices[i]) for i in replaced}
    x = torch.cat([b.x for b in part.batches(32)])
    with torch.no_grad():
        want = teacher_activations(s, x)[-1]

    def error(student) -> float:
        with torch.no_grad():
            return float((student.forward_features(x) - want).pow(2).mean() / want.pow(2).mean())

    return s, choices, part, weights, error


def test_refitting_on_the_students_inputs_shrinks_the_compounded_error(tmp_path):
    """Three chained ops distilled on the teacher's inputs (phase 1) compound their errors;
    re-distilled in network order on the student's own inputs, the last layer's output gets
    much closer to the teacher's. The teacher layer kept in the student is not touched, and the
    caller's random stream does not move."""
    replaced = (1, 2, 3)
    s, choices, part, weights, error = _chained(tmp_path, replaced)
    student = s.assemble(choices, weights=weights).eval()
    before = error(student)
    kept = copy.deepcopy(student.layers[0].state_dict())
    state = torch.random.get_rng_state()
    rec = redistill(student, s, part, RedistillCfg(epochs=4, batch_size=8, lr=0.01),
                    progress=False)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert rec["steps"] == 16 and set(rec["layers"]) == set(replaced)
    assert rec["teacher_layers"] == []
    assert error(student) < 0.6 * before
    for k, v in student.layers[0].state_dict().items():
        assert torch.equal(v, kept[k]), k
    assert not student.training
    assert redistill(student, s, part, RedistillCfg(epochs=0), progress=False)["steps"] == 0


def test_teacher_lr_refits_the_kept_layers_after_the_first_replaced_one(tmp_path):
    """With `teacher_lr`, the teacher layers after the first replaced one learn to undo the
    error that reaches them: the last features end closer to the teacher's than when only the
    replaced op refits. The layer before the replaced one, the teacher's own modules and the
    refitted layers' BatchNorm statistics stay as they were."""
    s, choices, part, weights, error = _chained(tmp_path, (1,))
    after = [i for i in range(2, len(s.layers))]
    cfg = RedistillCfg(epochs=4, batch_size=8, lr=0.01)
    only_op = s.assemble(choices, weights=weights).eval()
    redistill(only_op, s, part, cfg, progress=False)
    student = s.assemble(choices, weights=weights).eval()
    start = copy.deepcopy(student.state_dict())
    teacher_state = copy.deepcopy(s.teacher.state_dict())
    rec = redistill(student, s, part, RedistillCfg(epochs=4, batch_size=8, lr=0.01,
                                                   teacher_lr=0.001), progress=False)
    assert rec["teacher_layers"] == after
    assert set(rec["layers"]) == {1, *after}
    assert error(student) < 0.8 * error(only_op)
    now = student.state_dict()
    for k, v in start.items():
        moved = not torch.equal(now[k], v)
        if k.startswith("layers.0."):
            assert not moved, k
        elif k.startswith("layers.2.") and k.endswith(("running_mean", "running_var")):
            assert not moved, k  # eval mode: the teacher's statistics kept
        elif k.startswith("layers.2.") and k.endswith("weight"):
            assert moved, k
    for k, v in s.teacher.state_dict().items():
        assert torch.equal(v, teacher_state[k]), k


def test_teacher_lr_must_be_a_positive_rate_or_null(tmp_path):
    for bad in (0, -1e-3, True, "fast"):
        path = tmp_path / "r.yaml"
        path.write_text(f"redistill:\n  teacher_lr: {bad!r}\n".replace("'", ""))
        with pytest.raises(RecipeError, match="redistill.teacher_lr"):
            load_recipe(str(path))
    path.write_text("redistill:\n  teacher_lr: 0.0001\n")
    assert load_recipe(str(path)).redistill.teacher_lr == 1e-4
