import pytest

from compressor import RecipeError, list_recipes, load_recipe


def test_every_shipped_recipe_loads_and_validates():
    """The family recipes (the paper's hyperparameters) chain to default and pass the checks."""
    names = list_recipes()
    assert {"efficientnet-imagenet-gpu", "efficientnet_b4-imagenet-gpu",
            "efficientnet_b6-imagenet-gpu", "efficientnet_lite-imagenet-gpu"} <= set(names)
    for name in names:
        load_recipe(name)
    b4 = load_recipe("efficientnet_b4-imagenet-gpu")
    assert (b4.distill.lr, b4.distill.batch_size, b4.finetune.lr) == (0.0005, 40, 0.04)
    assert b4.finetune.epochs == 100 and b4.finetune.decay_rate == 0.97


def test_shipped_recipes_load():
    assert {"default", "tf_efficientnet_lite0-cpu"} <= set(list_recipes())
    r = load_recipe("tf_efficientnet_lite0-cpu")
    assert r.distill.optimizer == "adam" and r.search.k == 20  # k inherited from default
    assert "identity" in r.pool.include


def test_bad_recipes(tmp_path):
    with pytest.raises(RecipeError, match="unknown recipe"):
        load_recipe("nope")
    p = tmp_path / "r.yaml"
    p.write_text("distill:\n  learning_rate: 3\n")
    with pytest.raises(RecipeError, match="learning_rate"):
        load_recipe(str(p))
    p.write_text("!!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(str(p))


def test_recipe_values_are_checked(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("distill:\n  optimizer: lbfgs\n")
    with pytest.raises(RecipeError, match="distill.optimizer is 'lbfgs'"):
        load_recipe(str(p))


@pytest.mark.parametrize("body, match", [
    ("search:\n  gap: 1.5\n", "search.gap is 1.5"),
    ("search:\n  gap: .nan\n", "search.gap is nan"),
    ("search:\n  total_time_limit: -1\n", "search.total_time_limit is -1"),
    ("search:\n  total_time_limit: soon\n", "search.total_time_limit is 'soon'"),
    ("search:\n  rerank_top: -1\n", "search.rerank_top is -1"),
    ("search:\n  rerank_images: 0\n", "search.rerank_images is 0"),
    ("fitness:\n  bn_recalibrate_images: -3\n", "fitness.bn_recalibrate_images is -3"),
    ("search:\n  time_limit: 0\n", "search.time_limit is 0"),
    ("distill:\n  inherited_race: 0\n", "distill.inherited_race is 0"),
    ("distill:\n  inherited_race: 1.5\n", "distill.inherited_race is 1.5"),
    ("search:\n  block_drop_runoff: 1\n", "search.block_drop_runoff must be true or false"),
    ("search:\n  block_drop_candidate: yes please\n",
     "search.block_drop_candidate must be true or false"),
])
def test_search_time_and_gap_are_checked(tmp_path, body, match):
    p = tmp_path / "r.yaml"
    p.write_text(body)
    with pytest.raises(RecipeError, match=match):
        load_recipe(str(p))


def test_search_time_and_gap_defaults_prove_every_optimum():
    r = load_recipe("default")
    assert r.search.gap == 0.0 and r.search.total_time_limit is None
    p = r.override("search", gap=0.01, total_time_limit=30)
    assert (p.search.gap, p.search.total_time_limit) == (0.01, 30)


def test_default_yaml_states_exactly_the_dataclass_defaults():
    """One source of defaults: the recipe dataclasses; recipes/default.yaml documents them and
    may not drift (function signatures take theirs from the dataclasses too)."""
    import inspect

    from compressor.evolution import nsga2
    from compressor.recipe import Recipe, SearchCfg
    from compressor.search import solve

    assert load_recipe("default") == Recipe(name="default")
    sig = inspect.signature(solve).parameters
    for name in ("k", "overlap", "solver", "time_limit", "total_time_limit", "gap"):
        assert sig[name].default == getattr(SearchCfg(), name), name
    sig = inspect.signature(nsga2).parameters
    assert (sig["pop_size"].default, sig["generations"].default) == (
        SearchCfg().pop_size, SearchCfg().generations)


def test_runtime_and_finetune_fields_are_checked(tmp_path):
    for text, match in [("runtime:\n  amp: fp8", "runtime.amp"),
                        ("runtime:\n  device: npu", "runtime.device"),
                        ("finetune:\n  ema_decay: 1.5", "ema_decay"),
                        ("finetune:\n  mixup: -1", "mixup"),
                        ("data:\n  train_scale: [0.5, 0.1]", "train_scale")]:
        p = tmp_path / "r.yaml"
        p.write_text(text + "\n")
        with pytest.raises(RecipeError, match=match):
            load_recipe(str(p))


def test_runtime_resolves_to_the_cpu_in_fp32_here():
    import dataclasses

    import torch

    from compressor.recipe import RuntimeCfg
    from compressor.runtime import resolve_runtime

    rt = resolve_runtime(RuntimeCfg())
    if not torch.cuda.is_available():
        assert rt.device.type == "cpu" and rt.amp is None  # auto: no autocast on the CPU
        assert resolve_runtime(dataclasses.replace(RuntimeCfg(), amp="bf16")).amp is None
    rt = resolve_runtime(RuntimeCfg(device="cpu", channels_last=True, loader_workers=3))
    assert rt.loader_workers == 3 and rt.channels_last
    x = rt.input(torch.randn(2, 3, 8, 8))
    assert x.is_contiguous(memory_format=torch.channels_last)
    m = torch.nn.Conv2d(3, 4, 3)
    assert rt.module(m) is not m  # a copy in the recipe's memory format; the original stays
    assert rt.module(m).weight.is_contiguous(memory_format=torch.channels_last)
    plain = resolve_runtime(RuntimeCfg(device="cpu"))
    assert plain.module(m) is m and plain.to_dict()["device"] == "cpu"
