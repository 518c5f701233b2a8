import pytest

from compressor import RecipeError, list_recipes, load_recipe


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
