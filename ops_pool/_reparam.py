"""Re-parameterization of train-time multi-branch ops into their inference form."""

import timm.utils.model
from torch import nn

__all__ = ["reparameterize"]


def reparameterize(module: nn.Module, inplace: bool = False) -> nn.Module:
    """Fuse multi-branch ops (``repvgg_*``) into single convs for latency, export and inference.

    Wraps :func:`timm.utils.model.reparameterize_model`, which calls ``fuse()``,
    ``reparameterize()`` or ``switch_to_deploy()`` on every sub-module that has one; the module
    itself is handled too (timm's helper only visits children), so this works on a single op as
    well as on a whole assembled network. Ops without such methods come back unchanged. The
    fused module computes the same function as the original in eval mode (BN running statistics
    are folded into the convs), so call it after training.

    Args:
        module: an op from :func:`ops_pool.build`, or any network containing ops.
        inplace: modify ``module`` itself; by default a deep copy is fused and returned and
            ``module`` is left as it was (e.g. to keep training it).

    Returns:
        The fused module, in the same train/eval mode. With ``inplace`` it is ``module`` itself
        unless ``module`` has a ``fuse()`` method (then it is what ``fuse()`` returned).

    Example:
        >>> import torch, ops_pool
        >>> op = ops_pool.build("repvgg_3x3_ex1.0", (16, 8, 8), (16, 8, 8)).eval()
        >>> fused = ops_pool.reparameterize(op)
        >>> x = torch.randn(2, 16, 8, 8)
        >>> bool(torch.allclose(fused(x), op(x), atol=1e-4))
        True
    """
    # Wrapped in a Sequential so that timm's helper, which visits children, also visits `module`.
    return timm.utils.model.reparameterize_model(nn.Sequential(module), inplace=inplace)[0]
