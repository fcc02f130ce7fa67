"""The digits recipe, shortened, for the tests that train or build from a config."""

import json
from pathlib import Path

from l0sparse.training.config import load_config

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def quick_config(**overrides):
    texts = [f"{key}={json.dumps(value)}" for key, value in overrides.items()]
    return load_config(RECIPES / "mlp-digits.toml", ["epochs=4", "hidden=[16]"] + texts)
