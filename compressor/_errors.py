"""One exception base for the package; subclasses are user errors that say the next step."""

__all__ = [
    "CompressorError",
    "SplitError",
    "DataError",
    "RecipeError",
    "ModelError",
    "SearchError",
    "InfeasibleError",
    "ArtifactError",
    "DistillError",
]


class CompressorError(Exception):
    """Base of every error the tool raises on purpose; the CLI prints it as one line, exit 2."""


class ModelError(CompressorError):
    """Unknown model name, unreadable checkpoint, or a model we cannot use."""


class SplitError(CompressorError):
    """The model cannot be traced or has no single-input single-output layers."""


class DataError(CompressorError):
    """Missing, empty or unreadable data."""


class RecipeError(CompressorError):
    """A recipe file that is missing or malformed."""


class SearchError(CompressorError):
    """The integer program could not be solved."""


class InfeasibleError(SearchError):
    """The requested speedup is below what the pool can reach."""


class ArtifactError(CompressorError):
    """A work-dir artifact that is corrupt or belongs to another run."""


class DistillError(CompressorError):
    """Distillation cannot run as configured (device, memory, or the torchrun process group)."""
