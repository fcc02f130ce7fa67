"""The ``round_to`` config key: what ``l0sparse prune`` rounds kept widths to unless ``--round-to`` says otherwise
(the MiniLM recipes set 8: docs/hf.md)."""

import sys
from pathlib import Path

import pytest

from l0sparse.cli import main
from l0sparse.training.config import load_config
from l0sparse.training.train import run_training

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def test_round_to_defaults_to_1_and_the_minilm_recipes_set_8():
    assert load_config(RECIPES / "mlp-digits.toml").round_to == 1
    assert load_config(RECIPES / "mlp-digits.toml", ["round_to=16"]).round_to == 16
    for name in ("minilm-wordnet-l0-flops50", "minilm-wordnet-importance-flops50", "minilm-wordnet-l0-flops25",
                 "minilm-wordnet-importance-flops25", *(f"minilm-wordnet-taylor-flops{n}" for n in (5, 10, 25, 50))):
        assert load_config(RECIPES / f"{name}.toml").round_to == 8


@pytest.mark.parametrize("value", ["0", "-8", "2.5", "true", "'8'"])
def test_a_bad_round_to_names_the_key_and_what_it_must_be(value):
    with pytest.raises(ValueError, match=r"config key 'round_to' = .*: must be an int >= 1"):
        load_config(RECIPES / "mlp-digits.toml", [f"round_to={value}"])


def test_l0sparse_prune_rounds_as_the_run_s_config_says_unless_round_to_is_given(tmp_path, monkeypatch):
    config = load_config(RECIPES / "mlp-digits.toml", ["epochs=1", "hidden=[16]", "round_to=3"])
    run_training(config, tmp_path / "run", progress=False)
    module = sys.modules["l0sparse.core.prune"]
    real, asked = module.prune, []

    def spy(*args, round_to=1, **kwargs):
        asked.append(round_to)
        return real(*args, round_to=round_to, **kwargs)

    monkeypatch.setattr(module, "prune", spy)
    assert main(["prune", str(tmp_path / "run")]) == 0
    assert main(["prune", str(tmp_path / "run"), "--force", "--round-to", "1"]) == 0
    assert asked == [3, 1]


@pytest.mark.parametrize("value, shown", [("0", "0"), ("-1", "-1"), ("true", "'true'"), ("2.5", "'2.5'")])
def test_a_bad_round_to_option_names_the_option_and_what_it_must_be(value, shown, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["prune", str(tmp_path / "run"), "--round-to", value])
    assert exit_info.value.code == 2
    assert f"argument --round-to: must be an int >= 1, got {shown}" in capsys.readouterr().err
