"""Built-in op families; importing this package registers them.

Imported in the paper's order (section 3.1), which is the order :func:`ops_pool.list_ops` and
:func:`ops_pool.valid_ops` return them in.
"""

# isort: off
from . import identity, efficientnet, conv_blocks, repvgg, attention, mlp

# isort: on

__all__ = ["identity", "efficientnet", "conv_blocks", "repvgg", "attention", "mlp"]
