"""``mlp_e{r}``: pre-norm MLP for transformer token layers ``(T, D_in) -> (T, D_out)``.

LayerNorm(D_in) -> Linear(D_in, hidden) -> GELU -> Linear(hidden, D_out), with
``hidden = round_channels(D_out * r)``.
"""

from functools import partial

from torch import nn

from .._layers import wrap_skip
from .._registry import register
from .._shapes import round_channels
from ._accepts import accepts_token

__all__ = ["MLP_RATIOS", "build_mlp"]

MLP_RATIOS = ("0.25", "0.5", "1.0")


def build_mlp(in_shape, out_shape, *, r: str) -> nn.Module:
    d_in, d_out = in_shape[1], out_shape[1]
    hidden = round_channels(d_out * float(r))
    body = nn.Sequential(
        nn.LayerNorm(d_in),
        nn.Linear(d_in, hidden),
        nn.GELU(),
        nn.Linear(hidden, d_out),
    )
    return wrap_skip(body, in_shape, out_shape)


for _r in MLP_RATIOS:
    register(f"mlp_e{_r}", accepts=accepts_token)(partial(build_mlp, r=_r))
