"""Recipes: YAML files of hyperparameters, loaded with yaml.safe_load into dataclasses."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from ._errors import RecipeError

__all__ = [
    "Recipe",
    "DataCfg",
    "PoolCfg",
    "DistillCfg",
    "FitnessCfg",
    "SearchCfg",
    "FinetuneCfg",
    "load_recipe",
    "list_recipes",
]


@dataclass
class DataCfg:
    seed: int = 0
    distill_fraction: float = 0.6
    search_fraction: float = 0.15
    candidate_eval_images: int = 64
    batch_size: int = 32


@dataclass
class PoolCfg:
    include: list[str] = field(default_factory=lambda: ["*"])
    exclude: list[str] = field(default_factory=list)


@dataclass
class DistillCfg:
    loss: str = "mse"
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    epochs: int = 1
    batch_size: int = 16
    seed: int = 0  # each op's initialisation and the batch order derive from it
    # How and where ops train, not what they learn (left out of the artifact key; see
    # `result_dict`): every setting gives the same weights, within float rounding.
    group_size: int | str = "auto"  # ops per layer per teacher pass; auto: from free memory
    cache_activations: bool | str = "auto"  # auto: cache when it fits cache_max_mib and memory
    cache_max_mib: int = 4096
    memory_fraction: float = 0.5  # of the free memory, for the cache and a streaming group
    workers: int | str = "auto"  # threads training ops side by side; auto: CPU threads, CUDA 1
    device: str = "auto"  # auto: this rank's GPU if CUDA is available, else cpu
    amp: bool | str = "auto"  # fp16 autocast + GradScaler; auto: on for CUDA, never on CPU

    SCHEDULE_FIELDS = ("group_size", "cache_activations", "cache_max_mib", "memory_fraction",
                       "workers", "device", "amp")

    def result_dict(self) -> dict:
        """The fields that decide the trained weights: what a distillation artifact is keyed by."""
        return {k: v for k, v in dataclasses.asdict(self).items()
                if k not in self.SCHEDULE_FIELDS}


@dataclass
class FitnessCfg:
    max_accuracy_drop: float = 5.0
    donnav2_filter: bool = False  # per layer, drop ops dominated in distill loss and latency


@dataclass
class SearchCfg:
    k: int = 20
    overlap: float = 0.7
    solver: str = "highs"
    method: str = "ip"  # ip (Eq. 4) | nsga2 (DONNA-style evolutionary search)
    pop_size: int = 64
    generations: int = 100
    hardware_in_loop: bool = False  # NSGA-II: measure latency end to end (target hardware here)
    time_limit: float = 20.0  # seconds per solution
    total_time_limit: float | None = None  # seconds for all K solutions (None: no cap)
    gap: float = 0.0  # relative gap a solution may stop at (0: prove every optimum)
    verify_rounds: int = 3
    tolerance: float = 0.03


@dataclass
class FinetuneCfg:
    epochs: int = 2
    batch_size: int = 32
    opt: str = "sgd"
    lr: float = 0.005
    momentum: float = 0.9
    weight_decay: float = 1e-5
    sched: str = "cosine"
    warmup_epochs: int = 0
    gamma_ce: float = 1.0
    gamma_kl: float = 1.0
    kl_temperature: float = 1.0


_SECTIONS = {
    "data": DataCfg,
    "pool": PoolCfg,
    "distill": DistillCfg,
    "fitness": FitnessCfg,
    "search": SearchCfg,
    "finetune": FinetuneCfg,
}


@dataclass
class Recipe:
    """All hyperparameters of a run; `to_dict` is what the report and the cache keys record."""

    name: str = "default"
    data: DataCfg = field(default_factory=DataCfg)
    pool: PoolCfg = field(default_factory=PoolCfg)
    distill: DistillCfg = field(default_factory=DistillCfg)
    fitness: FitnessCfg = field(default_factory=FitnessCfg)
    search: SearchCfg = field(default_factory=SearchCfg)
    finetune: FinetuneCfg = field(default_factory=FinetuneCfg)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def override(self, section: str, **values) -> Recipe:
        """A copy with some fields of one section replaced (None values are ignored)."""
        values = {k: v for k, v in values.items() if v is not None}
        new = getattr(self, section)
        return dataclasses.replace(self, **{section: dataclasses.replace(new, **values)})


def list_recipes() -> list[str]:
    return sorted(
        p.name[: -len(".yaml")]
        for p in resources.files("recipes").iterdir()
        if p.name.endswith(".yaml")
    )


def _read(name_or_path: str) -> tuple[str, dict]:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise RecipeError(f"recipe file {path} does not exist")
        text, name = path.read_text(), path.stem
    else:
        res = resources.files("recipes").joinpath(f"{name_or_path}.yaml")
        if not res.is_file():
            raise RecipeError(
                f"unknown recipe '{name_or_path}'; known recipes: {', '.join(list_recipes())} "
                "(or give a path to a .yaml file)"
            )
        text, name = res.read_text(), name_or_path
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise RecipeError(f"recipe {name_or_path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {name_or_path} must be a mapping of sections")
    return name, data


def load_recipe(name_or_path: str = "default") -> Recipe:
    """Load a recipe by name (``recipes/NAME.yaml``) or path; ``base:`` chains to another."""
    name, data = _read(name_or_path)
    seen = {name}
    chain = [data]
    while "base" in chain[-1]:
        base = chain[-1]["base"]
        if base in seen:
            raise RecipeError(f"recipe {name_or_path}: 'base' chain loops at '{base}'")
        seen.add(base)
        chain.append(_read(base)[1])
    recipe = Recipe(name=name)
    for layer in reversed(chain):
        if not isinstance(layer, dict):
            raise RecipeError(f"recipe {name_or_path} must be a mapping of sections")
        for section, values in layer.items():
            if section == "base":
                continue
            if section not in _SECTIONS:
                raise RecipeError(
                    f"recipe {name_or_path}: unknown section '{section}'; "
                    f"sections are {', '.join(_SECTIONS)}"
                )
            try:
                recipe = recipe.override(section, **(values or {}))
            except TypeError as e:
                raise RecipeError(f"recipe {name_or_path}, section '{section}': {e}") from e
    _validate(recipe, name_or_path)
    return recipe


_CHOICES = {
    ("distill", "optimizer"): ("sgd", "adam"),
    ("distill", "loss"): ("mse", "nsr"),
    ("search", "method"): ("ip", "nsga2"),
}


def _validate(recipe: Recipe, source: str) -> None:
    for (section, key), allowed in _CHOICES.items():
        value = getattr(getattr(recipe, section), key)
        if value not in allowed:
            raise RecipeError(
                f"recipe {source}: {section}.{key} is {value!r}; choose one of {', '.join(allowed)}"
            )
    if not isinstance(recipe.search.hardware_in_loop, bool):
        raise RecipeError(f"recipe {source}: search.hardware_in_loop must be true or false")
    if not 0 < recipe.search.overlap <= 1:
        raise RecipeError(f"recipe {source}: search.overlap must be in (0, 1]")
    _validate_search_time(recipe.search, source)
    _validate_distill(recipe.distill, source)


def _validate_search_time(c: SearchCfg, source: str) -> None:
    def number(x) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isnan(x)

    if not number(c.time_limit) or c.time_limit <= 0:
        raise RecipeError(f"recipe {source}: search.time_limit is {c.time_limit!r}; give "
                          "seconds per solution > 0")
    if c.total_time_limit is not None and (not number(c.total_time_limit)
                                           or c.total_time_limit <= 0):
        raise RecipeError(f"recipe {source}: search.total_time_limit is "
                          f"{c.total_time_limit!r}; give seconds > 0, or null for no cap")
    if not number(c.gap) or not 0 <= c.gap < 1:
        raise RecipeError(f"recipe {source}: search.gap is {c.gap!r}; give a relative gap in "
                          "[0, 1) (0 proves every optimum)")


def _validate_distill(d: DistillCfg, source: str) -> None:
    for key in ("group_size", "workers"):
        g = getattr(d, key)
        if g != "auto" and (isinstance(g, bool) or not isinstance(g, int) or g < 1):
            raise RecipeError(
                f"recipe {source}: distill.{key} is {g!r}; give auto or a whole number >= 1"
            )
    for key in ("cache_activations", "amp"):
        value = getattr(d, key)
        if value not in ("auto", True, False) or type(value) not in (str, bool):
            raise RecipeError(f"recipe {source}: distill.{key} is {value!r}; give auto, true "
                              "or false")
    if not 0 < d.memory_fraction <= 1:
        raise RecipeError(f"recipe {source}: distill.memory_fraction must be in (0, 1]")
    if d.cache_max_mib < 0:
        raise RecipeError(f"recipe {source}: distill.cache_max_mib must be >= 0")
    if d.device != "auto" and str(d.device).split(":")[0] not in ("cpu", "cuda"):
        raise RecipeError(
            f"recipe {source}: distill.device is {d.device!r}; give auto, cpu, cuda or cuda:N"
        )
