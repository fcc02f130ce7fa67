"""l0sparse.training.config: the recipes are valid configs, and a config refuses what a run cannot use."""

import re

import pytest

from l0sparse.training.config import load_config

from configs import RECIPES, quick_config


def test_every_recipe_is_a_valid_config():
    recipes = sorted(RECIPES.glob("*.toml"))
    assert len(recipes) >= 5
    for recipe in recipes:
        load_config(recipe)


def test_lk_regularizer_with_a_negative_strength_is_named():
    with pytest.raises(ValueError, match="lam"):
        quick_config(regularizer="l1", lam=-1.0)


def test_a_recipe_named_flops_n_targets_n_percent_of_the_flops_and_the_readme_s_recipes_exist():
    named = {recipe.stem: recipe for recipe in RECIPES.glob("*-flops*.toml")}
    # one recipe per figure the README claims for MiniLM: L0 and the baseline at 25% and 50%
    assert {f"minilm-wordnet-{method}-flops{n}" for method in ("l0", "importance") for n in (25, 50)} <= set(named)
    for stem, recipe in named.items():
        percent = int(re.search(r"-flops(\d+)", stem).group(1))
        config = load_config(recipe)
        assert (config.target, config.metric) == (percent / 100, "flops"), stem
    readme = (RECIPES.parent / "README.md").read_text()
    mentioned = set(re.findall(r"recipes/([\w.-]+\.toml)", readme))
    assert {"minilm-wordnet-l0-flops25.toml", "minilm-wordnet-l0-flops50.toml"} <= mentioned
    assert all((RECIPES / name).exists() for name in mentioned), mentioned
