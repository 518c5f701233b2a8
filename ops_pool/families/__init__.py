"""Built-in op families; importing this package registers them."""

from . import conv_blocks, efficientnet, identity, mlp

__all__ = ["conv_blocks", "efficientnet", "identity", "mlp"]
