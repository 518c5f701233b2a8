"""Split beyond plain sequences of blocks (issue 14): trees, cross-stage units, multi-branch
modules, token mixers, user-named layers, train-mode traces, other input sizes.

Models are timm's smallest of each kind, at small inputs and random weights; the pipeline
test (one ``compress`` per structural kind) takes about a minute in all.
"""

import copy
import logging

import pytest
import timm
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

import compressor
from compressor import SplitError
from compressor._fx import TrainEvalModule


def _exact(model: nn.Module, size, **kwargs) -> compressor.Split:
    """Split `model` and check that assemble(teacher * N) reproduces it."""
    model = model.eval()
    s = compressor.split(model, input_size=size, **kwargs)
    x = torch.randn(2, *size)
    with torch.no_grad():
        ref, out = model(x), s.assemble(["teacher"] * len(s.layers)).eval()(x)
    assert (ref - out).abs().max().item() <= 1e-5
    for a, b in zip(s.layers, s.layers[1:]):
        assert a.out_shape == b.in_shape
    return s


def _timm(name: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **kwargs)


# one model per structural kind the block rule refused (random weights, small inputs)
def test_tree_nodes_are_layers():
    s = _exact(_timm("dla46x_c"), (3, 32, 32))
    assert [la.name for la in s.layers] == [f"level{i}" for i in range(6)]
    assert type(s.layers[2].module).__name__ == "DlaTree"


def test_cross_stage_unit_is_one_layer():
    s = _exact(_timm("cs3darknet_focus_s"), (3, 32, 32))
    names = [la.name for la in s.layers]
    assert names[:4] == ["stages.0.conv_down", "stages.0.conv_exp", "stages.0.blocks",
                         "stages.0.conv_transition"]
    # the split into two halves and their concatenation are inside the blocks layer
    piece = s.layers[2].module
    assert isinstance(piece, torch.fx.GraphModule)
    assert {"split", "cat"} <= {n.target.__name__ for n in piece.graph.nodes
                                if n.op == "call_function"} | {
        n.target for n in piece.graph.nodes if n.op == "call_method"}


class _Branches(nn.Module):
    """An Inception-style module: three branches concatenated."""

    def __init__(self, c: int):
        super().__init__()
        self.b1 = nn.Conv2d(c, c // 2, 1)
        self.b3 = nn.Sequential(nn.Conv2d(c, c // 4, 1), nn.Conv2d(c // 4, c // 4, 3, padding=1))
        self.pool = nn.Sequential(nn.AvgPool2d(3, 1, 1), nn.Conv2d(c, c // 4, 1))

    def forward(self, x):
        return torch.cat([self.b1(x), self.b3(x), self.pool(x)], 1)


class _Inception(nn.Module):
    """Multi-branch modules as the model's own children, as timm's inception_v3 has them."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, stride=2)
        self.pool1 = nn.MaxPool2d(2)
        self.mixed_a, self.mixed_b, self.mixed_c = _Branches(16), _Branches(16), _Branches(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.mixed_c(self.mixed_b(self.mixed_a(self.pool1(self.conv1(x)))))
        return self.fc(x.mean((2, 3)))


def test_multi_branch_modules_are_layers():
    s = _exact(_Inception(), (3, 32, 32))
    assert [la.name for la in s.layers] == ["mixed_a", "mixed_b", "mixed_c"]
    assert isinstance(s.layers[0].module, _Branches)


def test_token_mixer_blocks_with_shape_reads_between_them():
    s = _exact(_timm("poolformerv2_s12"), (3, 32, 32))
    assert [la.name for la in s.layers[:3]] == ["stages.0.blocks.0", "stages.0.blocks.1",
                                                "stages.1.downsample"]


def test_class_token_stages_cut_at_their_blocks():
    s = _exact(_timm("pit_ti_224", img_size=48), (3, 48, 48))
    assert s.layers[0].name == "transformers.0.blocks.0" and len(s.layers) == 12


def test_non_square_and_features_only():
    _exact(_timm("test_resnet"), (3, 96, 128))
    s = _exact(_timm("dla46x_c"), (3, 64, 32))
    assert len(s.layers) == 6
    one = _timm("resnet18", features_only=True, out_indices=(4,))
    s = compressor.split(one.eval(), input_size=(3, 32, 48))
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        (ref,), (out,) = one(x), s.assemble(["teacher"] * len(s.layers)).eval()(x)
    assert torch.equal(ref, out) and len(s.layers) == 8
    with pytest.raises(SplitError, match="returns 5 tensors .*features_only.*one out_indices"):
        compressor.split(_timm("resnet18", features_only=True).eval(), input_size=(3, 32, 32))


class _TwoStreams(nn.Module):
    """Blocks that carry two tensors (TNT's pixel and patch streams): nothing to cut."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.inner = nn.ModuleList(nn.Conv2d(8, 8, 3, padding=1) for _ in range(3))
        self.outer = nn.ModuleList(nn.Conv2d(8, 8, 3, padding=1) for _ in range(3))
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        p = q = self.stem(x)
        for inner, outer in zip(self.inner, self.outer):
            p = inner(p)
            q = outer(q) + p
        return self.fc(q.mean((2, 3)))


def test_models_with_several_streams_are_refused_in_one_line():
    with pytest.raises(SplitError) as e:
        compressor.split(_TwoStreams(), input_size=(3, 8, 8))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("_TwoStreams: found no sequence of two or more")
    assert "is used again by" in msg and "--layers" in msg


# layers= / --layers
def test_named_layers():
    m = _timm("test_resnet")
    s = _exact(m, (3, 32, 32), layers=["layer*"])  # outermost of the nested matches
    assert [la.name for la in s.layers] == ["layer1", "layer2", "layer3", "layer4"]
    assert all(la.module is m.get_submodule(la.name) for la in s.layers)
    s = _exact(_timm("dla46x_c"), (3, 32, 32), layers=["level[1-3]", "level5"])
    assert [la.name for la in s.layers] == ["level1", "level2", "level3", "level5"]
    assert s.layers[-1].in_shape == (64, 4, 4)  # level4 runs with level5


def test_named_layers_refusals():
    m = _timm("test_resnet").eval()
    size = (3, 32, 32)
    with pytest.raises(SplitError, match="pattern 'nope' matches no module"):
        compressor.split(m, input_size=size, layers=["nope"])
    with pytest.raises(SplitError, match=r"layer 'layer1.0.conv1' is not cuttable: 'maxpool' "
                                         r"from before it is also used after it"):
        compressor.split(m, input_size=size, layers=["layer1.0.conv1"])
    with pytest.raises(SplitError, match="layers=\\[\\] names no module"):
        compressor.split(m, input_size=size, layers=[])

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1)

        def forward(self, x):
            return self.b(self.a(self.a(x))).mean((2, 3))

    with pytest.raises(SplitError, match="layer 'a' runs 2 times per forward"):
        compressor.split(Twice(), input_size=(3, 8, 8), layers=["a", "b"])


def test_cli_split_layers():
    from compressor.cli import hant

    res = CliRunner().invoke(hant, ["split", "test_resnet", "--layers", "layer1,layer2.*"])
    assert res.exit_code == 0, res.output
    names = [line.split()[1] for line in res.output.splitlines()[1:]]
    assert "2 layers" in res.output and names == ["layer1", "layer2.0"]
    res = CliRunner().invoke(hant, ["split", "test_resnet", "--layers", "layer1.0.conv1"])
    assert res.exit_code == 2
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "not cuttable" in lines[0]


class _Block(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())


class _ShapeBranch(nn.Module):
    """Untraceable in plain torch.fx: a branch on the input's rank (taken for the split's
    size) and a block that branches on its data (kept whole when named as a layer)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.b1, self.b2, self.b3 = _Block(), _DataBlock(), _Block()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        if x.ndim == 3:
            x = x[None]
        return self.fc(self.b3(self.b2(self.b1(self.stem(x)))).mean((2, 3)))


class _DataBlock(_Block):
    def forward(self, x):
        x = super().forward(x)
        return x * 2 if x.mean() > 0 else x


def test_untraceable_block_named_then_kept_whole():
    m = _ShapeBranch().eval()
    with pytest.raises(SplitError, match=r"_ShapeBranch: torch.fx cannot trace module "
                                         r"'b2': .*naming it in layers="):
        compressor.split(m, input_size=(3, 16, 16))
    s = _exact(m, (3, 16, 16), layers=["b?"])
    assert [la.name for la in s.layers] == ["b1", "b2", "b3"]


# train-mode traces
class _DropoutHead(nn.Module):
    def __init__(self, contained: bool = True):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        blocks = [nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()) for _ in range(2)]
        if contained:
            self.blocks = nn.Sequential(*blocks)
        else:  # not in a container: the graph rule cuts it
            self.b1, self.b2 = blocks
        self.fc = nn.Linear(8, 4)
        self.contained = contained

    def forward(self, x):
        x = self.stem(x)
        x = self.blocks(x) if self.contained else self.b2(self.b1(x))
        x = x.mean((2, 3))
        if self.training:  # a branch taken in train mode only
            x = x * 2.0
        return self.fc(F.dropout(x, p=0.5, training=self.training))


@pytest.mark.parametrize("contained", [True, False])
def test_head_dropout_and_train_branch_kept_for_training(caplog, contained):
    torch.manual_seed(0)
    m = _DropoutHead(contained).eval()
    with caplog.at_level(logging.WARNING, logger="compressor.split"):
        s = _exact(m, (3, 8, 8))
    assert [la.name for la in s.layers] == (["blocks.0", "blocks.1"] if contained
                                             else ["b1", "b2"])
    assert "train-mode trace differs from the eval-mode one in the head" in caplog.text
    assert isinstance(s.head, TrainEvalModule) and not isinstance(s.stem, TrainEvalModule)
    student = s.assemble(["teacher"] * len(s.layers))
    x = torch.randn(4, 3, 8, 8)
    m.train()
    for net in (student, copy.deepcopy(student)):
        with torch.no_grad():
            assert torch.equal(net.eval()(x), m.eval()(x))
        net.train()
        torch.manual_seed(1)
        a = net(x)
        torch.manual_seed(1)
        assert torch.equal(a, m.train()(x))  # dropout and the train-only branch, as m
        assert not torch.equal(net(x), a)
    assert student.state_dict().keys() == copy.deepcopy(student).train().state_dict().keys()


# the rest of the pipeline on one model of each structural kind (about a minute on a CPU)
# (test_vit: attention blocks, which the LUT exports through the dynamo exporter)
_KINDS = [("dla46x_c", {}), ("cs3darknet_focus_s", {}), ("inception_v3", {}),
          ("poolformerv2_s12", {}), ("test_vit", {})]


@pytest.mark.slow
@pytest.mark.parametrize("name,kwargs", _KINDS)
def test_compress_each_structural_kind(name, kwargs, tmp_path, fast_recipe):
    from .conftest import make_images

    data = make_images(tmp_path / "images", 24, size=40)
    op = "mlp_e0.25" if name == "test_vit" else "cb_bottle_3x3_ex0.125"
    recipe = fast_recipe.override("pool", include=["identity", op])
    size = {"inception_v3": (3, 96, 96), "test_vit": (3, 160, 160)}.get(name, (3, 64, 64))
    teacher = _timm(name, **kwargs).eval()
    result = compressor.compress(teacher, data, "cpu", 0.7, recipe=recipe, input_size=size,
                                 work_dir=tmp_path / "work", progress=False)
    n = len(compressor.split(teacher, input_size=size).layers)
    assert len(result.report["student"]["choices"]) == n
    with torch.no_grad():
        assert result.model.eval()(torch.randn(1, *size)).shape == (1, 1000)
