"""Errors of the latency package; messages say what was wrong and what to do."""

__all__ = ["LutError", "UnknownTargetError", "BackendUnavailableError"]


class LutError(ValueError):
    """A LUT file that is corrupt, foreign, or does not match the request."""


class UnknownTargetError(LutError):
    """A target name that is neither a profile nor a LUT file."""


class BackendUnavailableError(LutError):
    """The measuring backend is not installed or has no device here."""
