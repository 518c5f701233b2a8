"""Ops that start from the teacher layer's weights (ops_pool.inherit): exact where the structure
allows it, the most important channels where it is narrower, untouched where nothing aligns; and
the distillation records what each op inherited and its loss before the first update."""

import dataclasses

import pytest
import timm
import torch
from timm.models._efficientnet_blocks import DepthwiseSeparableConv, InvertedResidual
from torch import nn

import compressor
import ops_pool
from compressor import distill as distill_mod
from compressor.data import Images
from compressor.distill import distill
from compressor.recipe import DistillCfg
from compressor.store import Store


def _randomise(m: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.Conv2d):
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) * 0.3)
                if mod.bias is not None:
                    mod.bias.copy_(torch.randn(mod.bias.shape, generator=g) * 0.1)
            elif isinstance(mod, nn.BatchNorm2d):
                n = mod.num_features
                mod.weight.copy_(0.5 + torch.rand(n, generator=g))
                mod.bias.copy_(torch.randn(n, generator=g) * 0.1)
                mod.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                mod.running_var.copy_(0.5 + torch.rand(n, generator=g))
    return m.eval()


def _err(op: nn.Module, teacher: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        t = teacher(x)
        return float((op.eval()(x) - t).pow(2).mean() / t.pow(2).mean())


X16 = torch.randn(3, 16, 8, 8, generator=torch.Generator().manual_seed(1))
X32 = torch.randn(3, 32, 8, 8, generator=torch.Generator().manual_seed(2))


def _ir(k=5, e=6, act=nn.SiLU, **kw):
    return _randomise(InvertedResidual(16, 16, k, exp_ratio=e, act_layer=act, **kw))


@pytest.mark.parametrize("name, teacher, what", [
    ("efn_5x5_e6_se1.00", lambda: _ir(), "copy"),  # the same block
    ("efn_5x5_e6_se1.00", lambda: _ir(k=3), "3x3->5x5"),  # larger kernel: zero-padded
    ("efn_5x5_e6_se1.00", lambda: _ir(e=3), "48->96 ch"),  # wider: extra channels unused
    ("efn_5x5_e6_se0.25", lambda: _ir(), "constant gate"),  # an SE the teacher lacks
    ("cb_bottle_5x5_ex4.0", lambda: _ir(e=4, act=nn.ReLU), "dw->dense"),  # dw on the diagonal
])
def test_inheriting_keeps_the_teachers_function_where_the_structure_allows(name, teacher, what):
    t = teacher()
    op = ops_pool.build(name, (16, 8, 8), (16, 8, 8))
    assert _err(op, t, X16) > 0.05  # its own init is far from the teacher
    assert what in ops_pool.inherit(op, t)
    assert _err(op, t, X16) < 1e-10


def test_a_lite_block_is_copied_exactly_only_by_the_relu6_family():
    """EfficientNet-Lite's blocks use ReLU6: an ``efnlite`` op with the block's structure
    computes its function exactly, a SiLU ``efn`` op with the same weights does not."""
    t = _ir(act=nn.ReLU6)
    lite = ops_pool.build("efnlite_5x5_e6", (16, 8, 8), (16, 8, 8))
    assert ops_pool.inherit(lite, t) == "copy"
    assert _err(lite, t, X16) < 1e-10
    silu = ops_pool.build("efn_5x5_e6_se1.00", (16, 8, 8), (16, 8, 8))
    assert ops_pool.inherit(silu, t) == "copy"
    assert _err(silu, t, X16) > 1e-3
    assert ops_pool.list_ops("efnlite_3x3_*") == [f"efnlite_3x3_e{e}" for e in (1, 2, 3, 4, 6)]


def test_depthwise_separable_teacher_is_copied_into_an_e1_block():
    t = _randomise(DepthwiseSeparableConv(32, 16, 3, act_layer=nn.SiLU))
    op = ops_pool.build("efn_3x3_e1_se1.00", (32, 8, 8), (16, 8, 8))
    assert ops_pool.inherit(op, t) == "copy"
    assert _err(op, t, X32) < 1e-10


def test_a_narrower_op_keeps_the_most_important_channels():
    """Half of the teacher's hidden channels feed nothing (zero projection weights): an e3 op
    that keeps the other half computes exactly the teacher's block; the wrong half would not."""
    t = _ir(k=3)
    with torch.no_grad():
        dead = torch.arange(96) % 2 == 0
        t.conv_pwl.weight[:, dead] = 0
    op = ops_pool.build("efn_3x3_e3_se1.00", (16, 8, 8), (16, 8, 8))
    assert ops_pool.inherit(op, t) == "96->48 ch"
    assert _err(op, t, X16) < 1e-10
    # a smaller kernel takes the centre: close to the teacher, not exact
    op = ops_pool.build("efn_3x3_e6_se1.00", (16, 8, 8), (16, 8, 8))
    t5 = _ir(k=5)
    own = _err(op, t5, X16)
    assert ops_pool.inherit(op, t5) == "5x5->3x3"
    assert _err(op, t5, X16) < 0.75 * own  # random kernels: 9 of 25 taps carry a third


@pytest.mark.parametrize("name, teacher", [
    ("cb_stack_3x3_ex0.5", lambda: _ir()),  # two dense convs vs three: nothing aligns
    ("efn_3x3_e1_se1.00", lambda: _ir()),  # no expand conv: the depthwise conv sees other inputs
    ("efn_5x5_e6_se1.00", lambda: _ir(noskip=True)),  # the op adds a skip the teacher lacks
    ("efn_5x5_e6_se1.00", lambda: _ir(se_layer=timm.layers.SqueezeExcite)),  # teacher's SE
])
def test_nothing_is_changed_when_the_structures_do_not_align(name, teacher):
    t = teacher()
    op = ops_pool.build(name, (16, 8, 8), (16, 8, 8))
    before = {k: v.clone() for k, v in op.state_dict().items()}
    assert ops_pool.inherit(op, t) == ""
    assert all(torch.equal(before[k], v) for k, v in op.state_dict().items())


def test_distillation_records_inheritance_and_the_loss_before_training(tmp_path):
    """With inherit (the default) an op that can hold the teacher's block starts at a far lower
    loss than the same op from its own init; the result says what it took."""
    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet")
    x = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    for m in model.modules():  # norm statistics of these images, as a trained teacher has
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
    with torch.no_grad():
        model.train()(x)
    s = compressor.split(model.eval(), input_size=(3, 64, 64))
    layer, name = 1, "efnv2_3x3_e6_se1.00"  # the teacher's fused block, wider: exact start
    assert type(s.layers[layer].module).__name__ == "EdgeResidual"
    images = Images(x, torch.full((8,), -1))
    cands = {layer: [name]}
    out = {}
    for inherit in (True, False):
        cfg = dataclasses.replace(DistillCfg(batch_size=4, lr=1e-4), inherit=inherit)
        root = tmp_path / str(inherit)
        out[inherit] = distill(s, cands, images, cfg, Store(root), root / "d",
                               progress=False)[(layer, name)]
    assert out[True].inherited == "64->96 ch" and out[False].inherited == ""
    assert out[True].init_loss < 0.1 * out[False].init_loss
    assert out[True].loss < out[False].loss
    assert DistillCfg(inherit=True).result_dict() != DistillCfg(inherit=False).result_dict()


def test_the_first_batch_keeps_the_closest_start(tmp_path):
    """Every op starts at most as far from the teacher as its own init (the own init is one of
    the starts compared on the first batch); what it inherited is recorded only when kept."""
    torch.manual_seed(0)
    s = compressor.split(timm.create_model("test_efficientnet").eval(), input_size=(3, 64, 64))
    x = torch.randn(8, *s.input_size, generator=torch.Generator().manual_seed(3))
    images = Images(x, torch.full((8,), -1))
    cands = {1: ["efnv2_3x3_e3_se1.00", "efnv2_5x5_e6_se1.00", "cb_stack_3x3_ex0.5"],
             3: ["efn_3x3_e3_se0.25", "efn_5x5_e6_se0.25", "efn_3x3_e1_se1.00"]}
    res = {}
    for inherit in (True, False):
        cfg = dataclasses.replace(DistillCfg(batch_size=4, lr=1e-4), inherit=inherit)
        root = tmp_path / str(inherit)
        res[inherit] = distill(s, cands, images, cfg, Store(root), root / "d", progress=False)
    for key, r in res[True].items():
        assert r.init_loss <= res[False][key].init_loss + 1e-6, key
        if r.inherited:
            assert r.init_loss < res[False][key].init_loss, key
    assert res[True][(3, "efn_3x3_e1_se1.00")].inherited == ""  # nothing aligns
    assert any(r.inherited for r in res[True].values())


def test_an_inherited_start_also_trains_at_inherited_lr_and_the_lower_loss_is_kept(tmp_path):
    """With `distill.inherited_lr`, an op that keeps an inherited start trains at both rates,
    each run as it would alone, and keeps the run whose last epoch ends at the lower loss; an
    op from its own init trains at `distill.lr` only."""
    torch.manual_seed(0)
    s = compressor.split(timm.create_model("test_efficientnet").eval(), input_size=(3, 64, 64))
    x = torch.randn(8, *s.input_size, generator=torch.Generator().manual_seed(3))
    images = Images(x, torch.full((8,), -1))
    own, inh = (3, "efn_3x3_e1_se1.00"), (1, "efnv2_3x3_e6_se1.00")  # nothing aligns; wider
    cands = {own[0]: [own[1]], inh[0]: [inh[1]]}
    weights, res = {}, {}
    for name, lr, inherited_lr in [("fast", 0.01, None), ("both", 0.01, 1e-4),
                                   ("slow", 1e-4, None)]:
        cfg = DistillCfg(batch_size=4, optimizer="adam", lr=lr, inherited_lr=inherited_lr,
                         inherited_race=1.0)  # both to the end
        root = tmp_path / name
        res[name] = distill(s, cands, images, cfg, Store(root), root / "d", progress=False)
        weights[name] = {k: distill_mod.load_weights(Store(root), root / "d", *k)
                         for k in (own, inh)}
    assert res["both"][inh].inherited and not res["both"][own].inherited

    def same(a, b, key):
        return all(torch.equal(weights[a][key][p], weights[b][key][p]) for p in weights[a][key])

    assert same("fast", "both", own) and res["both"][own].lr == 0.01
    kept = min(("fast", "slow"), key=lambda n: res[n][inh].loss)
    assert res["fast"][inh].loss != res["slow"][inh].loss
    assert res["both"][inh].lr == res[kept][inh].lr
    assert res["both"][inh].loss == pytest.approx(res[kept][inh].loss, rel=1e-6)
    assert same("both", kept, inh)
    assert DistillCfg(inherited_lr=0.001).result_dict() != DistillCfg().result_dict()


def test_with_inherited_race_the_run_behind_at_the_race_stops_and_the_other_trains_on(
        tmp_path, monkeypatch):
    """`distill.inherited_race` 0.5: at half the steps the run with the higher mean loss over
    the window (the second half of the steps so far) stops; the kept run trains to the end
    exactly as it would alone, and the op takes fewer steps than with both runs to the end."""
    torch.manual_seed(0)
    s = compressor.split(timm.create_model("test_efficientnet").eval(), input_size=(3, 64, 64))
    x = torch.randn(16, *s.input_size, generator=torch.Generator().manual_seed(3))
    images = Images(x, torch.full((16,), -1))
    inh = (1, "efnv2_3x3_e6_se1.00")
    steps: dict[str, int] = {}
    raced: list[list[tuple[float, float]]] = []
    real_step, real_race = distill_mod._OpTrainer._step, distill_mod._OpTrainer._race

    def counted(self, run, *a):
        steps[current] = steps.get(current, 0) + 1
        return real_step(self, run, *a)

    def race(self):
        raced.append([(r.lr, r.race_sum / r.race_count) for r in self.runs])
        assert all(r.race_count == 2 for r in self.runs)  # steps 3-4 of 4 before the race
        return real_race(self)

    monkeypatch.setattr(distill_mod._OpTrainer, "_step", counted)
    monkeypatch.setattr(distill_mod._OpTrainer, "_race", race)
    weights, res = {}, {}
    for current, lr, inherited_lr, race_at in [("fast", 0.01, None, 0.5),
                                                ("slow", 1e-4, None, 0.5),
                                                ("both", 0.01, 1e-4, 1.0),
                                                ("race", 0.01, 1e-4, 0.5)]:
        cfg = DistillCfg(batch_size=4, epochs=2, optimizer="adam", lr=lr,
                         inherited_lr=inherited_lr, inherited_race=race_at)
        root = tmp_path / current
        res[current] = distill(s, {inh[0]: [inh[1]]}, images, cfg, Store(root), root / "d",
                               progress=False)[inh]
        weights[current] = distill_mod.load_weights(Store(root), root / "d", *inh)
    assert res["race"].inherited
    assert steps["fast"] == steps["slow"] == 8 and steps["both"] == 16
    assert steps["race"] == 8 + 4  # the loser stopped after 4 of its 8 steps
    assert len(raced) == 1  # only the op with two runs races
    winner = min(raced[0], key=lambda r: r[1])[0]
    solo = "fast" if winner == 0.01 else "slow"
    assert res["race"].lr == winner
    assert res["race"].loss == pytest.approx(res[solo].loss, rel=1e-6)
    assert all(torch.equal(weights["race"][p], weights[solo][p]) for p in weights[solo])
    assert DistillCfg(inherited_race=1.0).result_dict() != DistillCfg().result_dict()
