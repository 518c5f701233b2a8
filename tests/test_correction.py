"""The closed-form correction of replaced ops, folded into their last conv and BatchNorm."""

import copy

import pytest
import timm
import torch
from timm.data import create_transform

import compressor
import ops_pool
from compressor.correction import correct, fold_linear, foldable_tail
from compressor.data import ImagePart, scan_images
from compressor.distill import teacher_activations
from compressor.recipe import RedistillCfg
from compressor.redistill import redistill

from .conftest import make_images


def _bn_from_data(module: torch.nn.Module, x: torch.Tensor) -> None:
    """Random affine BatchNorms whose running statistics are those of `x`'s pass (so that
    train and eval mode agree on it, as after re-distillation)."""
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_()
            m.momentum = None  # a cumulative average: one pass sets the statistics
            m.reset_running_stats()
    module.train()
    with torch.no_grad():
        module(x)
    module.eval()


@pytest.mark.parametrize("name, in_shape, out_shape", [
    ("efnlite_3x3_e3", (16, 12, 12), (16, 12, 12)),  # with a skip connection
    ("cb_bottle_3x3_ex0.25", (16, 12, 12), (24, 6, 6)),  # without
])
def test_the_fold_computes_the_linear_map_in_eval_and_train_mode(name, in_shape, out_shape):
    torch.manual_seed(0)
    op = ops_pool.build(name, in_shape, out_shape)
    x = torch.randn(8, *in_shape)
    _bn_from_data(op, x)
    conv, bn, residual = foldable_tail(op)
    assert residual == (in_shape == out_shape)
    seen = []
    hook = bn.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    with torch.no_grad():
        op(x)
    hook.remove()
    y = seen[0]
    c = y.shape[1]
    flat = y.transpose(0, 1).reshape(c, -1).double()
    w, b = torch.randn(c, c) / c ** 0.5, torch.randn(c)
    fold_linear(conv, bn, w, b, flat.mean(1), torch.cov(flat, correction=0))
    want = torch.einsum("ck,nkhw->nchw", w, y) + b[None, :, None, None]
    if residual:
        want = want + x
    with torch.no_grad():
        assert torch.allclose(op(x), want, atol=1e-4)
        # batch statistics of the same data: the same function, up to the unbiased running
        # variances of the earlier BatchNorms
        op.train()
        assert float((op(x) - want).abs().max()) < 2e-3 * float(want.abs().max())


def test_ops_without_a_dense_tail_do_not_qualify():
    assert foldable_tail(ops_pool.build("identity", (16, 8, 8), (16, 8, 8))) is None
    dw = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False),
                             torch.nn.BatchNorm2d(8))
    assert foldable_tail(dw) is None


def test_correction_lowers_the_error_it_reports_and_leaves_teacher_layers(tmp_path):
    """Replaced ops of a student (untrained, so far from the teacher) corrected in network
    order: the error each reports after the fit is the error its output then has on the same
    images, lower than before; teacher layers kept in the student are untouched."""
    torch.manual_seed(0)
    teacher = timm.create_model("test_efficientnet").eval()
    s = compressor.split(teacher, input_size=(3, 48, 48))
    choices = ["teacher"] * len(s.layers)
    for i in (1, 2):
        choices[i] = next(op for op in ops_pool.valid_ops(s.layers[i].in_shape,
                                                          s.layers[i].out_shape)
                          if op.startswith("efnlite"))
    student = s.assemble(choices).eval()
    root = make_images(tmp_path / "imgs", 24, size=56)
    part = ImagePart(scan_images(root), range(24), create_transform(48))
    kept = copy.deepcopy(student.layers[0].state_dict())
    x = torch.cat([b.x for b in part.batches(24)])

    def layer_error(i: int) -> float:
        with torch.no_grad():
            want = teacher_activations(s, x)[i + 1]
            h = student.stem(x)
            for layer in student.layers[: i + 1]:
                h = layer(h)
            return float((h - want).pow(2).mean() / want.pow(2).mean())

    first = layer_error(1)
    rec = correct(student, s, part, augment=False, progress=False)
    assert rec["skipped"] == [] and set(rec["layers"]) == {1, 2}
    assert rec["layers"][1]["before"] == pytest.approx(first, rel=1e-3)
    for i in (1, 2):
        assert rec["layers"][i]["after"] < rec["layers"][i]["before"]
        assert layer_error(i) == pytest.approx(rec["layers"][i]["after"], rel=2e-2, abs=1e-5)
    for k, v in student.layers[0].state_dict().items():
        assert torch.equal(v, kept[k]), k
    assert not student.training
    # as the re-distillation's last step (recipe redistill.correct), alone with 0 epochs
    again = s.assemble(choices).eval()
    out = redistill(again, s, part, RedistillCfg(epochs=0, correct=True, augment=False),
                    progress=False)
    assert out["steps"] == 0 and out["correction"]["layers"].keys() == {1, 2}
    assert all(v["after"] < v["before"] for v in out["correction"]["layers"].values())
