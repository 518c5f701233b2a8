"""Tests for the HANT op families (paper section 3.1) and their re-parameterization."""

import io

import pytest
import torch
from timm.layers.bottleneck_attn import BottleneckAttn
from timm.layers.lambda_layer import LambdaLayer
from timm.models.vision_transformer import Block
from torch import nn

import ops_pool

SAME = ((16, 8, 8), (16, 8, 8))
STRIDED = ((16, 15, 15), (24, 8, 8))
WIDER = ((16, 8, 8), (32, 8, 8))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These ops are tiny: one intra-op thread is several times faster than contending threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

# EfficientNet-B2's layers (in_shape, out_shape) after its stem, from compressor.split, at the
# paper's 260 px and at 256 px.
B2_LAYERS = {
    260: [
        ((32, 130, 130), (16, 130, 130)), ((16, 130, 130), (16, 130, 130)),
        ((16, 130, 130), (24, 65, 65)), ((24, 65, 65), (24, 65, 65)),
        ((24, 65, 65), (48, 33, 33)), ((48, 33, 33), (48, 33, 33)),
        ((48, 33, 33), (88, 17, 17)), ((88, 17, 17), (88, 17, 17)),
        ((88, 17, 17), (120, 17, 17)), ((120, 17, 17), (120, 17, 17)),
        ((120, 17, 17), (208, 9, 9)), ((208, 9, 9), (208, 9, 9)),
        ((208, 9, 9), (352, 9, 9)), ((352, 9, 9), (352, 9, 9)),
    ],
    256: [
        ((32, 128, 128), (16, 128, 128)), ((16, 128, 128), (16, 128, 128)),
        ((16, 128, 128), (24, 64, 64)), ((24, 64, 64), (24, 64, 64)),
        ((24, 64, 64), (48, 32, 32)), ((48, 32, 32), (48, 32, 32)),
        ((48, 32, 32), (88, 16, 16)), ((88, 16, 16), (88, 16, 16)),
        ((88, 16, 16), (120, 16, 16)), ((120, 16, 16), (120, 16, 16)),
        ((120, 16, 16), (208, 8, 8)), ((208, 8, 8), (208, 8, 8)),
        ((208, 8, 8), (352, 8, 8)), ((352, 8, 8), (352, 8, 8)),
    ],
}

FAMILY_COUNTS = {
    "identity": 1,
    "efn_*": 36,
    "efnv2_*": 36,
    "efnlite_*": 15,
    "cb_stack_*": 40,
    "cb_bottle_*": 40,
    "cb_res_*": 40,
    "repvgg_*": 40,
    "conv_cs_*": 40,
    "vit_*": 36,
    "bot_*": 6,
    "lambda_*": 6,
    "mlp_*": 3,
}


def test_family_counts_add_up_to_the_pool():
    counts = {pattern: len(ops_pool.list_ops(pattern)) for pattern in FAMILY_COUNTS}
    assert counts == FAMILY_COUNTS
    assert sum(counts.values()) == len(ops_pool.list_ops()) == 339


def test_paper_grid_names():
    for family in ("cb_stack", "cb_bottle", "cb_res", "repvgg", "conv_cs"):
        for k in (1, 3, 5, 7):
            for w in ("0.0625", "0.1", "0.125", "0.2", "0.25", "0.5", "1.0", "2.0", "3.0", "4.0"):
                assert ops_pool.is_registered(f"{family}_{k}x{k}_ex{w}")
    for family in ("efn", "efnv2"):
        for k in (1, 3, 5):
            for e in (1, 3, 6):
                for se in ("1.00", "0.04", "0.025", "0.25"):
                    assert ops_pool.is_registered(f"{family}_{k}x{k}_e{e}_se{se}")
    assert len(ops_pool.list_ops("vit_d[12]_w*_h*")) == 2 * 6 * 3
    assert ops_pool.list_ops("bot_*") == [f"bot_e{e}" for e in ("0.25", "0.5", "1.0", "2.0",
                                                                "3.0", "4.0")]
    assert ops_pool.list_ops("lambda_*") == [f"lambda_e{e}" for e in ("0.25", "0.5", "1.0", "2.0",
                                                                      "3.0", "4.0")]


def test_names_in_the_papers_figures_and_design_exist():
    for name in [
        "efn_3x3_e1_se1.00", "efn_3x3_e1_se0.25", "efn_3x3_e6_se0.25", "efnv2_3x3_e3_se1.00",
        "efnv2_3x3_e6_se1.00", "efnv2_5x5_e6_se1.00", "efnv2_1x1_e1_se1.00",
        "cb_stack_3x3_ex2.0", "cb_stack_3x3_ex0.1", "cb_stack_1x1_ex0.2", "cb_bottle_1x1_ex0.2",
        "cb_bottle_7x7_ex0.1", "cb_bottle_3x3_ex0.0625", "cb_bottle_1x1_ex0.125",
        "vit_d1_w256_h8", "bot_e0.5", "lambda_e1.0",
    ]:
        assert ops_pool.is_registered(name), name


@pytest.mark.parametrize("size", sorted(B2_LAYERS))
def test_efficientnet_b2_layers_get_at_least_190_candidates(size):
    counts = [len(ops_pool.valid_ops(i, o)) for i, o in B2_LAYERS[size]]
    assert min(counts) >= 190, counts


def test_attention_ops_refuse_high_resolution_layers():
    attention = set(ops_pool.list_ops("vit_*") + ops_pool.list_ops("bot_*")
                    + ops_pool.list_ops("lambda_*"))
    assert ops_pool.MAX_ATTENTION_POSITIONS == 1024
    for layer in [((16, 130, 130), (24, 65, 65)), ((48, 33, 33), (48, 33, 33)),
                  ((24, 65, 65), (48, 33, 33))]:
        assert not attention & set(ops_pool.valid_ops(*layer)), layer
    for layer in [((48, 32, 32), (48, 32, 32)), ((24, 64, 64), (48, 32, 32)),
                  ((88, 17, 17), (120, 17, 17))]:
        assert attention <= set(ops_pool.valid_ops(*layer)), layer
    tokens = set(ops_pool.valid_ops((197, 64), (197, 64)))
    assert set(ops_pool.list_ops("vit_*")) <= tokens
    assert not tokens & set(ops_pool.list_ops("bot_*") + ops_pool.list_ops("lambda_*"))
    assert not set(ops_pool.list_ops("vit_*")) & set(ops_pool.valid_ops((1025, 64), (1025, 64)))


def _convs(module):
    return [m for m in module.modules() if isinstance(m, nn.Conv2d)]


def test_efnv2_is_a_fused_mbconv():
    single = ops_pool.build("efnv2_5x5_e1_se1.00", *STRIDED)
    convs = _convs(single)
    assert [(c.kernel_size, c.stride, c.in_channels, c.out_channels) for c in convs] == [
        ((5, 5), (2, 2), 16, 24)
    ]
    fused = ops_pool.build("efnv2_3x3_e6_se0.04", *SAME).body
    convs = _convs(fused)
    assert convs[0].kernel_size == (3, 3) and convs[0].groups == 1 and convs[0].out_channels == 96
    assert convs[-1].kernel_size == (1, 1) and convs[-1].out_channels == 16
    assert sum(isinstance(m, ops_pool.SqueezeExcite) for m in fused.modules()) == 1
    pointwise = ops_pool.build("efn_1x1_e3_se1.00", *STRIDED)
    assert [c.kernel_size for c in _convs(pointwise)] == [(1, 1)] * 3


def test_dense_block_structures():
    stack = _convs(ops_pool.build("cb_stack_7x7_ex0.5", *STRIDED))
    assert [(c.kernel_size[0], c.stride[0], c.out_channels) for c in stack] == [(7, 2, 16),
                                                                                  (7, 1, 24)]
    res = ops_pool.build("cb_res_5x5_ex2.0", *STRIDED)  # projection shortcut: shapes differ
    assert isinstance(res, ops_pool.families.conv_blocks.ResidualPair)
    assert [c.kernel_size[0] for c in _convs(res.body)] == [5, 1]
    assert [(c.kernel_size[0], c.stride[0]) for c in _convs(res.shortcut)] == [(1, 2)]
    assert isinstance(ops_pool.build("cb_res_3x3_ex1.0", *SAME), ops_pool.Residual)
    cs = ops_pool.build("conv_cs_3x3_ex1.0", *WIDER)
    assert cs.half == 16 and cs.conv2[0].in_channels == 16 and cs.transition[0].in_channels == 32


def test_attention_ops_use_timm_layers_at_the_output_resolution():
    vit = ops_pool.build("vit_d2_w64_h8", *STRIDED)
    blocks = [m for m in vit.modules() if isinstance(m, Block)]
    assert len(blocks) == 2 and blocks[0].attn.num_heads == 8
    assert vit.pos_embed.shape == (1, 64, 64)  # 8x8 positions of width 64
    bot = ops_pool.build("bot_e2.0", *STRIDED)
    attn = [m for m in bot.modules() if isinstance(m, BottleneckAttn)]
    assert len(attn) == 1 and attn[0].num_heads == 4
    assert (attn[0].pos_embed.height, attn[0].pos_embed.width) == (8, 8)
    assert attn[0].dim_out_v == 48  # round_channels(24 * 2.0)
    lam = ops_pool.build("lambda_e0.5", *SAME)
    assert [m.dim_v for m in lam.modules() if isinstance(m, LambdaLayer)] == [2]  # 8 / 4 heads
    token_vit = ops_pool.build("vit_d1_w32_h4", (10, 36), (10, 20))
    assert token_vit(torch.randn(2, 10, 36)).shape == (2, 10, 20)


def _randomize_bn(module):
    """Move BN scales, shifts and running statistics off their defaults (as after training)."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)


@pytest.mark.parametrize("k", [1, 3, 5, 7])
@pytest.mark.parametrize("layer", [SAME, STRIDED, WIDER], ids=["same", "strided", "wider"])
def test_repvgg_reparameterizes_to_one_conv_per_block(k, layer):
    torch.manual_seed(k)
    op = ops_pool.build(f"repvgg_{k}x{k}_ex1.0", *layer)
    _randomize_bn(op)
    op.eval()
    fused = ops_pool.reparameterize(op)
    assert fused is not op and fused.training is False
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    convs = _convs(fused)
    assert len(convs) == 2 and all(c.kernel_size == (k, k) and c.bias is not None for c in convs)
    x = torch.randn(4, *layer[0])
    with torch.no_grad():
        torch.testing.assert_close(fused(x), op(x), atol=1e-4, rtol=1e-4)
    assert any(isinstance(m, nn.BatchNorm2d) for m in op.modules())  # the original is kept


def test_repvgg_identity_branches_only_where_shapes_allow():
    same = ops_pool.build("repvgg_3x3_ex1.0", *SAME).body
    assert [b.identity is not None for b in same] == [True, True]
    assert [b.identity is not None for b in ops_pool.build("repvgg_3x3_ex2.0", *SAME).body] == [
        False, False]
    strided = ops_pool.build("repvgg_3x3_ex1.0", *STRIDED)
    assert [b.identity is not None for b in strided] == [False, True]


def test_reparameterize_in_place_on_a_network_and_leaves_other_ops_alone():
    torch.manual_seed(0)
    net = nn.Sequential(
        ops_pool.build("repvgg_5x5_ex0.5", *STRIDED),
        ops_pool.build("efn_3x3_e3_se0.04", (24, 8, 8), (24, 8, 8)),
        ops_pool.build("repvgg_3x3_ex1.0", (24, 8, 8), (24, 8, 8)),
    )
    _randomize_bn(net)
    net.eval()
    x = torch.randn(2, *STRIDED[0])
    with torch.no_grad():
        before = net(x)
        out = ops_pool.reparameterize(net, inplace=True)
        assert out is net
        torch.testing.assert_close(net(x), before, atol=1e-4, rtol=1e-4)
    assert all(b.reparam_conv is not None for b in [*net[0], *net[2].body])
    assert any(isinstance(m, nn.BatchNorm2d) for m in net[1].modules())  # efn is not multi-branch
    traced = torch.fx.symbolic_trace(net)
    torch.testing.assert_close(traced(x), net(x))


@pytest.mark.parametrize(
    ("name", "layer"),
    [
        ("efnv2_3x3_e6_se0.25", STRIDED),
        ("cb_res_3x3_ex0.5", STRIDED),
        ("conv_cs_5x5_ex1.0", SAME),
        ("repvgg_3x3_ex1.0", STRIDED),
        ("vit_d1_w64_h4", STRIDED),
        ("bot_e1.0", SAME),
        ("lambda_e0.5", STRIDED),
    ],
)
def test_new_families_trace_and_export(name, layer):
    module = ops_pool.build(name, *layer).eval()
    x = torch.randn(2, *layer[0])
    with torch.no_grad():
        expected = module(x)
        torch.testing.assert_close(torch.fx.symbolic_trace(module)(x), expected)
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    f = io.BytesIO()
    torch.onnx.export(module, (x,), f, dynamo=False, input_names=["x"])
    sess = ort.InferenceSession(f.getvalue(), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {"x": x.numpy()})
    torch.testing.assert_close(torch.from_numpy(got), expected, atol=1e-4, rtol=1e-4)
