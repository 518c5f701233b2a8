"""HANT for timm: replace a trained network's slow layers with distilled efficient ones.

Example:
    >>> import compressor
    >>> result = compressor.compress("tf_efficientnet_lite0", data="images/", target="cpu",
    ...                              speedup=0.5)  # doctest: +SKIP
    >>> result.save_pretrained("out/")  # doctest: +SKIP
    >>> model = compressor.load("out/")  # doctest: +SKIP

The phases one by one (what ``hant`` runs)::

    run = compressor.prepare("tf_efficientnet_lite0", "images/", "cpu", 0.5)
    lat = pipeline.lut_step(run); pool = pipeline.distill_step(run, lat); ...
"""

from ._errors import (
    ArtifactError,
    CompressorError,
    DataError,
    DistillError,
    InfeasibleError,
    ModelError,
    RecipeError,
    SearchError,
    SplitError,
)
from .inputs import RunInputs, prepare
from .model import ARCHITECTURE, HantNet
from .pipeline import Result, compress
from .publish import load, push_to_hub, save_pretrained
from .recipe import Recipe, list_recipes, load_recipe
from .split import TEACHER, Layer, Split, TransformedNet, split

__version__ = "0.1.0"

__all__ = [
    "ARCHITECTURE",
    "ArtifactError",
    "CompressorError",
    "DataError",
    "DistillError",
    "HantNet",
    "InfeasibleError",
    "Layer",
    "ModelError",
    "Recipe",
    "RecipeError",
    "Result",
    "RunInputs",
    "SearchError",
    "Split",
    "SplitError",
    "TEACHER",
    "TransformedNet",
    "compress",
    "list_recipes",
    "load",
    "load_recipe",
    "prepare",
    "push_to_hub",
    "save_pretrained",
    "split",
]
