"""How figures are written in messages, the model card, the CLI summary and front tables."""

from __future__ import annotations

__all__ = ["format_value"]


def format_value(v, spec: str = ".3f", missing: str = "n/a") -> str:
    """A float with `spec`, anything else as ``str``, and None as `missing`.

    Example:
        >>> format_value(0.12345), format_value(None), format_value(3), format_value(2.5, ".1f")
        ('0.123', 'n/a', '3', '2.5')
    """
    if v is None:
        return missing
    return format(v, spec) if isinstance(v, float) else str(v)
