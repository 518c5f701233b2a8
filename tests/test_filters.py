"""DONNA's NSR distillation loss and DONNAv2's dominance filter."""

import torch

from compressor.distill import OpResult, _loss
from compressor.pipeline import Run


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
    run = Run.__new__(Run)
    run.distilled = {(0, "fast_good"): OpResult(0, "fast_good", 0.1),
                     (0, "slow_bad"): OpResult(0, "slow_bad", 0.3),
                     (0, "fast_bad"): OpResult(0, "fast_bad", 0.5)}
    run.b = [{"teacher": 1.0, "fast_good": 0.2, "slow_bad": 0.6, "fast_bad": 0.1}]
    layer = {"teacher": 0.0, "fast_good": 0.01, "slow_bad": 0.02, "fast_bad": 0.03}
    kept, removed = run._donnav2([layer])
    assert removed == 1 and set(kept[0]) == {"teacher", "fast_good", "fast_bad"}
