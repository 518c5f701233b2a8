"""Re-distillation of the chosen architecture on its own inputs."""

import copy

import timm
import torch
from timm.data import create_transform

import compressor
import ops_pool
from compressor.data import ImagePart, scan_images
from compressor.distill import distill, load_weights, teacher_activations
from compressor.recipe import DistillCfg, RedistillCfg
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
    assert error(student) < 0.6 * before
    for k, v in student.layers[0].state_dict().items():
        assert torch.equal(v, kept[k]), k
    assert not student.training
    assert redistill(student, s, part, RedistillCfg(epochs=0), progress=False)["steps"] == 0


def test_a_block_dropped_student_has_nothing_to_refit(tmp_path):
    """Identities have no weights: with no other replaced op the pass is skipped, and the
    student is left as it was."""
    torch.manual_seed(0)
    s = compressor.split(timm.create_model("test_resnet").eval(), input_size=(3, 48, 48))
    assert s.layers[0].in_shape == s.layers[0].out_shape
    student = s.assemble(["identity"] + ["teacher"] * (len(s.layers) - 1)).eval()
    root = make_images(tmp_path / "imgs", 8, size=56)
    part = ImagePart(scan_images(root), range(8), create_transform(48),
                     create_transform(48, is_training=True, scale=(0.25, 1.0)))
    before = copy.deepcopy(student.state_dict())
    rec = redistill(student, s, part, RedistillCfg(epochs=2, batch_size=4), progress=False)
    assert rec["steps"] == 0 and rec["layers"] == {}
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())
