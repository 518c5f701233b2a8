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
    "RedistillCfg",
    "RuntimeCfg",
    "default_recipe_name",
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
    # timm's train transform (create_transform(is_training=True)) for distill and finetune
    train_scale: list[float] = field(default_factory=lambda: [0.25, 1.0])
    train_hflip: float = 0.5
    train_color_jitter: float = 0.0
    train_auto_augment: str | None = None  # a timm auto-augment spec, e.g. rand-m9-mstd0.5


@dataclass
class RuntimeCfg:
    device: str = "auto"  # auto: this rank's GPU if CUDA is available, else cpu
    amp: bool | str = "auto"  # autocast on CUDA: auto (= fp16), fp16, bf16, false
    channels_last: bool = False
    loader_workers: int | str = "auto"  # decoding processes; auto: see data.loader_workers


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
    seed: int = 0  # each op's initialisation, the batch order and the views derive from it
    augment: bool = True  # train on augmented views (the teacher sees the same view)
    inherit: bool = True  # start each op from the teacher layer's weights where they align
    inherited_lr: float | None = None  # an op that keeps an inherited start also trains at
    # this rate, the run with the lower last-epoch loss kept (None: lr only)
    inherited_race: float = 0.5  # with inherited_lr: at this fraction of the steps the run
    # with the higher mean loss over the second half of the steps so far stops (1: both train
    # to the end)
    # How and where ops train, not what they learn (left out of the artifact key; see
    # `result_dict`): every setting gives the same weights, within float rounding.
    group_size: int | str = "auto"  # ops per layer per teacher pass; auto: from free memory
    cache_activations: bool | str = "auto"  # auto: cache when it fits cache_max_mib and memory
    cache_max_mib: int = 4096
    memory_fraction: float = 0.5  # of the free memory, for the cache and a streaming group
    workers: int | str = "auto"  # threads training ops side by side; auto: CPU threads, CUDA 1

    SCHEDULE_FIELDS = ("group_size", "cache_activations", "cache_max_mib", "memory_fraction",
                       "workers")

    def result_dict(self) -> dict:
        """The fields that decide the trained weights: what a distillation artifact is keyed by."""
        return {k: v for k, v in dataclasses.asdict(self).items()
                if k not in self.SCHEDULE_FIELDS}


@dataclass
class FitnessCfg:
    loss: str = "kl"  # kl: KL to the teacher's predictions; ce: cross-entropy where labelled
    max_accuracy_drop: float = 5.0
    donnav2_filter: bool = False  # per layer, drop ops dominated in distill loss and latency
    bn_recalibrate_images: int = 256  # ops' BatchNorm statistics re-estimated on this many
    # eval-view distill images before fitness and ranking (0: as distillation left them)


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
    refine_rounds: int = 0  # re-score every op in the best architecture's context, re-solve
    block_drop_candidate: bool = True  # rank the block-dropping baseline's architecture too
    # after the finetune: the block-dropping architecture at the pick's latency, re-distilled
    # and finetuned the same way, replaces the student when its search-part loss is lower and
    # it measures within the request (one more finetune)
    block_drop_runoff: bool = False
    rerank_top: int = 0  # re-rank the best this many after a brief re-distillation (0: off)
    rerank_images: int = 128  # distill images that re-distillation sees
    rerank_epochs: int = 1
    calibration_archs: int = 0  # networks measured end to end to calibrate a new LUT (0: none;
    # off by default: on dev-cpu a uniform fit made held-out networks worse, see BENCHMARKS.md)


@dataclass
class RedistillCfg:
    """Re-distillation of the chosen architecture on its own inputs (0 epochs: off)."""

    epochs: int = 0
    batch_size: int = 16
    lr: float = 0.001  # Adam, every replaced op from its phase-1 weights
    augment: bool = True
    correct: bool = False  # then a closed-form 1x1 correction per op, folded (no latency)


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
    decay_epochs: float = 90  # sched step: decay the lr every this many epochs ...
    decay_rate: float = 0.1  # ... by this factor
    gamma_ce: float = 1.0  # CE to the labels (only where every image has one)
    gamma_kl: float = 1.0  # KL to the teacher on the same augmented view
    kl_temperature: float = 1.0
    augment: bool = True  # timm's train transform (data.train_*)
    mixup: float = 0.0  # timm Mixup alpha (0: off)
    cutmix: float = 0.0  # timm CutMix alpha (0: off)
    label_smoothing: float = 0.0
    ema_decay: float = 0.998  # timm ModelEmaV3 with warm-up (0: no EMA)
    clip_grad: float | None = None  # gradient norm clip (None: off)
    patience: int | None = None  # stop after this many epochs without a lower search loss
    keep_start: bool = True  # the weights before training compete with the epochs' (epoch 0)
    freeze_bn: bool = False  # BatchNorm statistics kept (eval mode) while training
    feature_epochs: int = 0  # first match the teacher's features (the head's input)
    feature_lr: float | None = None  # the feature stage's lr (None: lr)
    feature_match: str = "last"  # last: the head's input; layers: every layer's output


_SECTIONS = {
    "data": DataCfg,
    "pool": PoolCfg,
    "distill": DistillCfg,
    "fitness": FitnessCfg,
    "search": SearchCfg,
    "redistill": RedistillCfg,
    "finetune": FinetuneCfg,
    "runtime": RuntimeCfg,
}
_MOVED = {("distill", "device"): "runtime.device", ("distill", "amp"): "runtime.amp"}


@dataclass
class Recipe:
    """All hyperparameters of a run; `to_dict` is what the report and the cache keys record."""

    name: str = "default"
    data: DataCfg = field(default_factory=DataCfg)
    pool: PoolCfg = field(default_factory=PoolCfg)
    distill: DistillCfg = field(default_factory=DistillCfg)
    fitness: FitnessCfg = field(default_factory=FitnessCfg)
    search: SearchCfg = field(default_factory=SearchCfg)
    redistill: RedistillCfg = field(default_factory=RedistillCfg)
    finetune: FinetuneCfg = field(default_factory=FinetuneCfg)
    runtime: RuntimeCfg = field(default_factory=RuntimeCfg)

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


def default_recipe_name(model: str, target: str | None) -> str:
    """The shipped recipe for `model` on `target` (``MODEL-TARGET``) if there is one, else
    ``default``: what ``compress`` uses without ``--recipe``."""
    named = f"{model}-{target or 'cpu'}"
    return named if named in list_recipes() else "default"


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
            for key in values or {}:
                if (section, key) in _MOVED:
                    raise RecipeError(f"recipe {name_or_path}: {section}.{key} is now "
                                      f"{_MOVED[section, key]} (it applies to every phase)")
            try:
                recipe = recipe.override(section, **(values or {}))
            except TypeError as e:
                raise RecipeError(f"recipe {name_or_path}, section '{section}': {e}") from e
    validate(recipe, name_or_path)
    return recipe


_CHOICES = {
    ("distill", "optimizer"): ("sgd", "adam"),
    ("distill", "loss"): ("mse", "nsr"),
    ("fitness", "loss"): ("kl", "ce"),
    ("search", "method"): ("ip", "nsga2"),
    ("finetune", "feature_match"): ("last", "layers"),
}


def validate(recipe: Recipe, source: str) -> None:
    """Raise RecipeError naming `source` for the first bad value in `recipe`."""
    for (section, key), allowed in _CHOICES.items():
        value = getattr(getattr(recipe, section), key)
        if value not in allowed:
            raise RecipeError(
                f"recipe {source}: {section}.{key} is {value!r}; choose one of {', '.join(allowed)}"
            )
    for key in ("hardware_in_loop", "block_drop_candidate", "block_drop_runoff"):
        if not isinstance(getattr(recipe.search, key), bool):
            raise RecipeError(f"recipe {source}: search.{key} must be true or false")
    if not 0 < recipe.search.overlap <= 1:
        raise RecipeError(f"recipe {source}: search.overlap must be in (0, 1]")
    n = recipe.fitness.bn_recalibrate_images
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise RecipeError(f"recipe {source}: fitness.bn_recalibrate_images is {n!r}; give a "
                          "whole number >= 0 (0: off)")
    _validate_search_time(recipe.search, source)
    _validate_distill(recipe.distill, source)
    _validate_runtime(recipe.runtime, source)
    _validate_finetune(recipe.finetune, recipe.data, source)


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
    for key, low in (("rerank_top", 0), ("rerank_images", 1), ("rerank_epochs", 1)):
        v = getattr(c, key)
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise RecipeError(f"recipe {source}: search.{key} is {v!r}; give a whole number "
                              f">= {low}")
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
    value = d.cache_activations
    if value not in ("auto", True, False) or type(value) not in (str, bool):
        raise RecipeError(f"recipe {source}: distill.cache_activations is {value!r}; give "
                          "auto, true or false")
    if not 0 < d.memory_fraction <= 1:
        raise RecipeError(f"recipe {source}: distill.memory_fraction must be in (0, 1]")
    if isinstance(d.inherited_race, bool) or not 0 < d.inherited_race <= 1:
        raise RecipeError(f"recipe {source}: distill.inherited_race is {d.inherited_race!r}; "
                          "give a fraction of the steps in (0, 1] (1: both runs to the end)")
    if d.cache_max_mib < 0:
        raise RecipeError(f"recipe {source}: distill.cache_max_mib must be >= 0")


def _validate_runtime(r: RuntimeCfg, source: str) -> None:
    if r.device != "auto" and str(r.device).split(":")[0] not in ("cpu", "cuda"):
        raise RecipeError(
            f"recipe {source}: runtime.device is {r.device!r}; give auto, cpu, cuda or cuda:N"
        )
    if r.amp not in ("auto", "fp16", "bf16", True, False) or type(r.amp) not in (str, bool):
        raise RecipeError(f"recipe {source}: runtime.amp is {r.amp!r}; give auto, fp16, bf16 "
                          "or false")
    w = r.loader_workers
    if w != "auto" and (isinstance(w, bool) or not isinstance(w, int) or w < 0):
        raise RecipeError(f"recipe {source}: runtime.loader_workers is {w!r}; give auto or a "
                          "whole number >= 0")


def _validate_finetune(f: FinetuneCfg, d: DataCfg, source: str) -> None:
    for key in ("keep_start", "freeze_bn"):
        if not isinstance(getattr(f, key), bool):
            raise RecipeError(f"recipe {source}: finetune.{key} is {getattr(f, key)!r}; give "
                              "true or false")
    if not 0 <= f.ema_decay < 1:
        raise RecipeError(f"recipe {source}: finetune.ema_decay is {f.ema_decay!r}; give a "
                          "decay in [0, 1) (0: no EMA)")
    if f.mixup < 0 or f.cutmix < 0 or not 0 <= f.label_smoothing < 1:
        raise RecipeError(f"recipe {source}: finetune.mixup and cutmix must be >= 0 and "
                          "label_smoothing in [0, 1)")
    sc = d.train_scale
    if (not isinstance(sc, (list, tuple)) or len(sc) != 2
            or not 0 < float(sc[0]) <= float(sc[1]) <= 1):
        raise RecipeError(f"recipe {source}: data.train_scale is {sc!r}; give [min, max] with "
                          "0 < min <= max <= 1 (fractions of the image area)")
