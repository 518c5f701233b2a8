"""DONNA's NSR distillation loss and DONNAv2's dominance filter."""

import torch

from compressor.distill import _loss
from compressor.fitness import donnav2_filter


def test_nsr_is_zero_for_a_perfect_op_and_per_channel_scale_free():
    t = torch.randn(4, 3, 5, 5)
    assert _loss("nsr", t.clone(), t, 1.0).item() == 0.0
    noisy = t + 0.1 * torch.randn_like(t)
    scale = torch.tensor([1.0, 100.0, 0.01]).view(1, 3, 1, 1)
    a = _loss("nsr", noisy, t, 1.0)
    b = _loss("nsr", noisy * scale, t * scale, 1.0)  # each channel scaled alike
    assert torch.allclose(a, b, rtol=1e-4)
    assert not torch.allclose(_loss("mse", noisy * scale, t * scale, 1.0),
                              _loss("mse", noisy, t, 1.0))
    tokens = torch.randn(2, 7, 16)
    assert _loss("nsr", tokens + 0.5, tokens, 1.0).item() > 0


def test_donnav2_drops_ops_dominated_in_loss_and_latency():
    loss = {"fast_good": 0.1, "slow_bad": 0.3, "fast_bad": 0.5}
    b = [{"teacher": 1.0, "fast_good": 0.2, "slow_bad": 0.6, "fast_bad": 0.1}]
    layer = {"teacher": 0.0, "fast_good": 0.01, "slow_bad": 0.02, "fast_bad": 0.03}
    kept, removed = donnav2_filter([layer], b, lambda i, op: loss.get(op, 0.0))
    assert removed == 1 and set(kept[0]) == {"teacher", "fast_good", "fast_bad"}
