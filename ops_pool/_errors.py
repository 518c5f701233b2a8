"""Exceptions raised by the operator registry."""

__all__ = ["OpsPoolError", "UnknownOpError", "OpShapeError"]


class OpsPoolError(ValueError):
    """Base class for every error raised by ``ops_pool``."""


class UnknownOpError(OpsPoolError):
    """No operator is registered under the requested name."""


class OpShapeError(OpsPoolError):
    """An operator cannot be built for, or does not produce, the layer's shapes."""
