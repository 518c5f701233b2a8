import pytest
import timm
import torch
from torch import nn

import compressor
from compressor import SplitError


def _check(name, **kwargs):
    torch.manual_seed(0)
    m = timm.create_model(name, **kwargs).eval()
    s = compressor.split(m)
    x = torch.randn(2, *s.input_size)
    with torch.no_grad():
        ref = m(x)
        out = s.assemble(["teacher"] * len(s.layers)).eval()(x)
    assert (ref - out).abs().max().item() <= 1e-5
    return s


@pytest.mark.parametrize("name", ["test_efficientnet", "test_resnet", "test_vit"])
def test_teacher_reassembles_exactly(name):
    s = _check(name)
    assert len(s.layers) >= 4
    for i, layer in enumerate(s.layers):
        assert layer.index == i and isinstance(layer.module, nn.Module)
        assert len(layer.in_shape) in (2, 3) and len(layer.out_shape) in (2, 3)
    # consecutive layers chain
    for a, b in zip(s.layers, s.layers[1:]):
        assert a.out_shape == b.in_shape


def test_efficientnet_layers_are_blocks():
    s = _check("test_efficientnet")
    assert [la.name for la in s.layers][:2] == ["blocks.0.0", "blocks.1.0"]


def test_resnet_layers_are_residual_blocks():
    s = _check("resnet18")
    assert [la.name for la in s.layers] == [
        f"layer{i}.{j}" for i in range(1, 5) for j in range(2)
    ]


# the architectures the splitter must handle (random weights; shapes only)
@pytest.mark.parametrize(
    "name,n_layers",
    [
        ("resnet50", 16), ("efficientnet_b0", 16), ("efficientnet_b4", 32),
        ("tf_efficientnet_lite0", 16), ("tf_efficientnet_lite2", 21), ("mobilenetv2_100", 17),
        ("mobilenetv3_large_100", 16), ("regnety_016", 27), ("convnext_tiny", 21),
        ("mnasnet_100", 17), ("rexnet_100", 17), ("vit_tiny_patch16_224", 12),
    ],
)
def test_model_zoo(name, n_layers):
    assert len(_check(name).layers) == n_layers


def test_assemble_with_ops_and_wrong_count():
    s = compressor.split(timm.create_model("test_efficientnet").eval())
    ops = ["teacher"] * len(s.layers)
    same = [i for i, la in enumerate(s.layers) if la.in_shape == la.out_shape]
    for i in same:
        ops[i] = "identity"
    model = s.assemble(ops).eval()
    assert model(torch.randn(1, *s.input_size)).shape == (1, 1000)
    with pytest.raises(SplitError, match="choices given"):
        s.assemble(["teacher"])


class _ThreeBlocks(nn.Module):
    """A stem, three conv blocks and a head; subclasses wire them."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(*[
            nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)) for _ in range(3)
        ])
        self.head = nn.Linear(8, 10)


class _TwoInputBlocks(_ThreeBlocks):
    """Blocks whose output is reused two layers later (a long skip)."""

    def forward(self, x):
        x = self.stem(x)
        y = self.blocks[0](x)
        z = self.blocks[2](self.blocks[1](y) + y)
        return self.head(z.mean((2, 3)))


def test_long_skip_goes_with_the_layer_it_spans():
    m = _TwoInputBlocks().eval()
    s = compressor.split(m, input_size=(3, 16, 16))
    assert [la.name for la in s.layers] == ["blocks.0", "blocks.1", "blocks.2"]
    # blocks.1 takes y and gives blocks.1(y) + y: the skip is inside that layer
    assert s.layers[0].module is m.blocks[0] and s.layers[1].module is not m.blocks[1]
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(s.assemble(["teacher"] * 3).eval()(x), m(x))


class _SkipOverAll(_ThreeBlocks):
    """The stem's output is added after the last block: no cut between the blocks."""

    def forward(self, x):
        x = self.stem(x)
        return self.head((self.blocks(x) + x).mean((2, 3)))


def test_untraceable_layout_names_model_and_node():
    with pytest.raises(SplitError, match=r"_SkipOverAll: .*inside 'blocks': the output of 'stem' "
                                         r"is used again by 'add'.*--layers"):
        compressor.split(_SkipOverAll(), input_size=(3, 16, 16))


class _NoBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


def test_model_without_layers():
    with pytest.raises(SplitError, match="_NoBlocks: found no sequence"):
        compressor.split(_NoBlocks(), input_size=(3, 16, 16))


class _DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(*[nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU())
                                      for _ in range(3)])

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow cannot be traced
            x = x * 2
        return self.blocks(x).mean((1, 2, 3))


def test_untraceable_model():
    with pytest.raises(SplitError, match="_DataDependent: torch.fx cannot trace"):
        compressor.split(_DataDependent(), input_size=(3, 8, 8))


def test_bad_op_names_say_op_layer_and_shapes(caplog):
    from compressor import RecipeError
    from compressor.inputs import candidate_ops
    from compressor.recipe import PoolCfg

    s = compressor.split(timm.create_model("test_efficientnet").eval())
    with pytest.raises(SplitError, match=r"layer 1 '.*' \(input .* -> output .*\).*'identity_x'.*"
                                         r"Did you mean: identity"):
        s.build_op(1, "identity_x")
    i = next(i for i, layer in enumerate(s.layers) if layer.in_shape != layer.out_shape)
    shape = "x".join(map(str, s.layers[i].in_shape))
    with pytest.raises(SplitError, match=f"layer {i} .*input {shape} .*'identity' does not accept"):
        s.build_op(i, "identity")
    with pytest.raises(RecipeError, match="'efn_9x9_e1_se1.00'.*matches no registered op.*"
                                          "efn_5x5_e1_se1.00"):
        candidate_ops(s, PoolCfg(include=["efn_9x9_e1_se1.00"]))
    tokens = compressor.split(timm.create_model("test_vit").eval())
    with caplog.at_level("WARNING"):
        ops = candidate_ops(tokens, PoolCfg(include=["efn_3x3_e1_se1.00", "mlp_*"]))
    assert "'efn_3x3_e1_se1.00', which fits none of the" in caplog.text
    assert all("efn_3x3_e1_se1.00" not in v for v in ops.values())
    ops = candidate_ops(s, PoolCfg(include=["identity", "efn_3x3_*"]))
    assert all(ops[j][0] == "teacher" for j in ops)
