"""Tests for the ops_pool candidate-operator registry."""

import io

import pytest
import torch
from torch import nn

import ops_pool
from ops_pool import OpShapeError, OpsPoolError, UnknownOpError

SAME_CONV = ((16, 8, 8), (16, 8, 8))
STRIDED_CONV = ((16, 15, 15), (24, 8, 8))
TOKEN = ((10, 32), (10, 32))
LAYERS = {"same_conv": SAME_CONV, "strided_conv": STRIDED_CONV, "token": TOKEN}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These ops are tiny: one intra-op thread is several times faster than contending threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _cases():
    for layer, (in_shape, out_shape) in LAYERS.items():
        for name in ops_pool.valid_ops(in_shape, out_shape):
            yield pytest.param(name, in_shape, out_shape, id=f"{layer}-{name}")


@pytest.mark.parametrize(("name", "in_shape", "out_shape"), list(_cases()))
def test_every_valid_op_builds_with_right_shape(name, in_shape, out_shape):
    module = ops_pool.build(name, in_shape, out_shape)
    assert module.training
    x = torch.randn(3, *in_shape)
    y = module(x)
    assert y.shape == (3, *out_shape)
    assert y.dtype == torch.float32
    assert torch.isfinite(y).all()
    if in_shape == out_shape:  # skip connection, last norm zero-initialised: starts as identity
        torch.testing.assert_close(y, x)


def test_every_op_is_valid_for_some_test_layer():
    covered = set()
    for in_shape, out_shape in LAYERS.values():
        covered.update(ops_pool.valid_ops(in_shape, out_shape))
    assert covered == set(ops_pool.list_ops())


def test_family_names_and_counts():
    assert len(ops_pool.list_ops("efn_*")) == 36
    assert len(ops_pool.list_ops("cb_stack_*")) == 40
    assert len(ops_pool.list_ops("cb_bottle_*")) == 40
    assert ops_pool.list_ops("mlp_*") == ["mlp_e0.25", "mlp_e0.5", "mlp_e1.0"]
    for name in [
        "efn_3x3_e6_se0.04",
        "efn_5x5_e1_se1.00",
        "efn_3x3_e3_se0.025",
        "cb_stack_1x1_ex0.25",
        "cb_stack_5x5_ex1.0",
        "cb_bottle_5x5_ex0.125",
        "identity",
    ]:
        assert ops_pool.is_registered(name), name


def test_names_used_by_recipes_and_tests_stay_valid():
    for name in [
        "identity",
        "efn_3x3_e1_se1.00",
        "cb_stack_3x3_ex0.25",
        "cb_stack_3x3_ex0.5",
        "cb_bottle_3x3_ex0.125",
        "cb_bottle_5x5_ex0.125",
        "mlp_e0.25",
    ]:
        assert ops_pool.is_registered(name), name
    assert len(ops_pool.list_ops("efn_*_e1_se1.00")) == 3
    assert ops_pool.list_ops("teacher") == []


def test_identity_only_for_equal_shapes_and_conv_count():
    assert "identity" in ops_pool.valid_ops(*SAME_CONV)
    assert "identity" in ops_pool.valid_ops(*TOKEN)
    assert "identity" not in ops_pool.valid_ops(*STRIDED_CONV)
    assert "identity" not in ops_pool.valid_ops((16, 14, 14), (24, 14, 14))
    with pytest.raises(OpShapeError, match="identity"):
        ops_pool.build("identity", *STRIDED_CONV)
    assert len(ops_pool.valid_ops((40, 28, 28), (40, 28, 28))) >= 12
    assert len(ops_pool.valid_ops((16, 112, 112), (24, 56, 56))) >= 12


def test_shape_families_do_not_mix():
    token_ops = ops_pool.valid_ops(*TOKEN)
    assert not any(n.startswith(("efn_", "cb_")) for n in token_ops)
    assert not any(n.startswith("mlp_") for n in ops_pool.valid_ops(*SAME_CONV))
    assert ops_pool.valid_ops((10, 32), (12, 32)) == []
    assert ops_pool.valid_ops((16, 14, 14), (16, 5, 5)) == []
    assert set(ops_pool.valid_ops(*TOKEN)) == {"identity", *ops_pool.list_ops("mlp_*"),
                                               *ops_pool.list_ops("vit_*")}


def test_shape_helpers():
    assert ops_pool.conv_stride((8, 14, 14), (16, 14, 14)) == 1
    assert ops_pool.conv_stride((8, 15, 15), (16, 8, 8)) == 2
    assert ops_pool.conv_stride((8, 15, 15), (16, 7, 7)) is None
    assert ops_pool.conv_stride((10, 32), (10, 32)) is None
    assert ops_pool.is_conv_shape((1, 2, 3)) and not ops_pool.is_conv_shape((1, 2))
    assert ops_pool.is_token_shape((1, 2)) and not ops_pool.is_token_shape((1, 2, 3))
    assert ops_pool.CHANNEL_DIVISOR == 8
    assert ops_pool.round_channels(1) == 8
    assert ops_pool.round_channels(100) == 104
    assert ops_pool.round_channels(40 * 6) == 240


def test_unknown_name_lists_close_match():
    with pytest.raises(UnknownOpError, match="efn_3x3_e6_se0.04"):
        ops_pool.build("efn_3x3_e6_se0.4", *SAME_CONV)
    with pytest.raises(UnknownOpError):
        ops_pool.unregister("no_such_op")


def test_duplicate_and_reserved_names_refused():
    with pytest.raises(OpsPoolError, match="An op is already registered under 'identity'"):
        ops_pool.register("identity")
    with pytest.raises(OpsPoolError, match="reserved"):
        ops_pool.register("teacher")


def test_user_op_with_wrong_output_shape_rejected():
    @ops_pool.register("my_test_op")
    def build_bad(in_shape, out_shape):
        return nn.Conv2d(in_shape[0], out_shape[0] + 1, 1)

    try:
        assert ops_pool.is_registered("my_test_op")
        assert "my_test_op" in ops_pool.valid_ops(*SAME_CONV)  # accepts=None: assumed valid
        with pytest.raises(OpShapeError, match=r"my_test_op.*\(2, 17, 8, 8\)"):
            ops_pool.build("my_test_op", *SAME_CONV)
    finally:
        ops_pool.unregister("my_test_op")
    assert not ops_pool.is_registered("my_test_op")


def test_register_check_refuses_wrong_output_shape_at_registration():
    def build_bad(in_shape, out_shape):
        return nn.Conv2d(in_shape[0], out_shape[0] + 1, 1)

    decorate = ops_pool.register("my_checked_op", check=[((16, 8, 8), (24, 8, 8))])
    with pytest.raises(OpShapeError) as info:
        decorate(build_bad)
    msg = str(info.value)
    assert "'my_checked_op'" in msg
    assert "(16, 8, 8) -> out_shape (24, 8, 8)" in msg  # the shapes asked
    assert "produced (2, 25, 8, 8)" in msg  # the shape the op produced
    assert not ops_pool.is_registered("my_checked_op")


def test_register_check_accepts_a_good_op_and_reports_crashes():
    @ops_pool.register("my_checked_ok", check=[((16, 8, 8), (24, 4, 4)), ((8, 3, 3), (8, 2, 2))])
    def build_ok(in_shape, out_shape):
        return nn.Conv2d(in_shape[0], out_shape[0], 3, stride=2, padding=1)

    try:
        assert ops_pool.is_registered("my_checked_ok")
    finally:
        ops_pool.unregister("my_checked_ok")

    def build_crash(in_shape, out_shape):
        raise RuntimeError("boom")

    with pytest.raises(OpShapeError, match=r"my_checked_crash.*RuntimeError.*boom"):
        ops_pool.register("my_checked_crash", check=[((8, 4, 4), (8, 4, 4))])(build_crash)
    assert not ops_pool.is_registered("my_checked_crash")
    with pytest.raises(OpShapeError, match="does not accept"):
        ops_pool.register(
            "my_checked_refused", accepts=lambda i, o: False, check=[((8, 4, 4), (8, 4, 4))]
        )(build_ok)
    assert not ops_pool.is_registered("my_checked_refused")
    with pytest.raises(OpsPoolError, match="pairs"):
        ops_pool.register("my_checked_typo", check=[(8, 4, 4)])


def test_channel_divisor_is_read_at_build_time():
    assert ops_pool.get_channel_divisor() == ops_pool.CHANNEL_DIVISOR == 8
    layer = ((40, 8, 8), (40, 8, 8))
    default = ops_pool.build("cb_bottle_3x3_ex0.25", *layer)
    assert default.body[0].out_channels == 16  # round(40 * 0.25 = 10) to 8
    with ops_pool.channel_divisor(32):
        assert ops_pool.get_channel_divisor() == 32
        assert ops_pool.round_channels(100) == 96
        wide = ops_pool.build("cb_bottle_3x3_ex0.25", *layer)
        se_op = ops_pool.build("efn_3x3_e6_se0.04", *layer)
    assert ops_pool.get_channel_divisor() == 8
    assert wide.body[0].out_channels == 32
    widths = [m.out_channels for m in se_op.modules() if isinstance(m, nn.Conv2d)]
    assert all(w % 32 == 0 for w in widths if w != 40), widths
    old = ops_pool.set_channel_divisor(4)
    try:
        assert old == 8
        assert ops_pool.round_channels(10) == 12
        assert ops_pool.round_channels(10, divisor=8) == 16
        assert ops_pool.build("bot_e0.25", *layer).body[1].out_channels == 12
    finally:
        ops_pool.set_channel_divisor(old)
    for bad in (0, -8, 2.5, True, "8"):
        with pytest.raises(ValueError, match="positive int"):
            ops_pool.set_channel_divisor(bad)
    assert ops_pool.get_channel_divisor() == 8


def test_user_op_failing_forward_is_shape_error():
    @ops_pool.register("my_test_op_crash", accepts=lambda i, o: True)
    def build_crash(in_shape, out_shape):
        return nn.Linear(in_shape[-1] + 1, 4)

    try:
        with pytest.raises(OpShapeError, match="my_test_op_crash"):
            ops_pool.build("my_test_op_crash", *TOKEN)
    finally:
        ops_pool.unregister("my_test_op_crash")


@pytest.mark.parametrize(
    ("name", "layer"),
    [
        ("efn_3x3_e6_se0.04", STRIDED_CONV),
        ("cb_stack_3x3_ex0.25", SAME_CONV),
        ("cb_bottle_5x5_ex0.125", STRIDED_CONV),
        ("mlp_e0.25", ((10, 36), (10, 20))),
    ],
)
def test_mid_widths_are_multiples_of_8(name, layer):
    module = ops_pool.build(name, *layer)
    widths = [m.out_channels for m in module.modules() if isinstance(m, nn.Conv2d)]
    widths += [m.out_features for m in module.modules() if isinstance(m, nn.Linear)]
    out_c = layer[1][-1] if len(layer[1]) == 2 else layer[1][0]
    inner = [w for w in widths if w != out_c and w != layer[0][0]]
    assert inner, widths
    assert all(w % 8 == 0 for w in inner), widths


def test_efn_structure():
    plain = ops_pool.build("efn_5x5_e1_se1.00", *SAME_CONV)
    convs = [m for m in plain.modules() if isinstance(m, nn.Conv2d)]
    assert [c.kernel_size for c in convs] == [(5, 5), (1, 1)]  # no expand for e == 1
    assert not any(isinstance(m, ops_pool.SqueezeExcite) for m in plain.modules())
    se_op = ops_pool.build("efn_3x3_e6_se0.04", (40, 28, 28), (40, 28, 28))
    se = [m for m in se_op.modules() if isinstance(m, ops_pool.SqueezeExcite)]
    assert len(se) == 1
    assert se[0].conv_reduce.out_channels == ops_pool.round_channels(240 * 0.04)
    strided = ops_pool.build("efn_3x3_e3_se1.00", *STRIDED_CONV)
    dw = [m for m in strided.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert len(dw) == 1 and dw[0].stride == (2, 2) and dw[0].groups == 48


def _zero_convs(module):
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.zero_()
                if m.bias is not None:
                    m.bias.zero_()


@pytest.mark.parametrize(
    ("name", "layer"),
    [
        ("efn_3x3_e6_se0.04", SAME_CONV),
        ("cb_stack_3x3_ex1.0", SAME_CONV),
        ("cb_bottle_3x3_ex0.25", SAME_CONV),
        ("mlp_e0.5", TOKEN),
    ],
)
def test_skip_connection_when_shapes_match(name, layer):
    module = ops_pool.build(name, *layer).eval()
    _zero_convs(module)
    x = torch.randn(2, *layer[0])
    torch.testing.assert_close(module(x), x)


def test_no_skip_when_shapes_differ():
    module = ops_pool.build("cb_stack_1x1_ex1.0", (16, 14, 14), (24, 14, 14)).eval()
    _zero_convs(module)
    assert module(torch.randn(2, 16, 14, 14)).abs().max() == 0


@pytest.mark.parametrize(
    ("name", "layer"),
    [("efn_5x5_e6_se0.025", STRIDED_CONV), ("cb_bottle_3x3_ex0.5", SAME_CONV), ("mlp_e1.0", TOKEN)],
)
def test_fx_traceable(name, layer):
    module = ops_pool.build(name, *layer).eval()
    traced = torch.fx.symbolic_trace(module)
    x = torch.randn(2, *layer[0])
    torch.testing.assert_close(traced(x), module(x))


def test_onnx_export_matches_torch():
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    torch.manual_seed(0)
    module = ops_pool.build("efn_3x3_e6_se0.04", *SAME_CONV)
    module(torch.randn(4, *SAME_CONV[0]))  # move BN running stats off their defaults
    module.eval()
    x = torch.randn(2, *SAME_CONV[0])
    f = io.BytesIO()
    torch.onnx.export(module, (x,), f, dynamo=False, input_names=["x"])
    sess = ort.InferenceSession(f.getvalue(), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {"x": x.numpy()})
    torch.testing.assert_close(torch.from_numpy(got), module(x).detach(), atol=1e-4, rtol=1e-4)
