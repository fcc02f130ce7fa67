"""Shared fixtures. How the tests are laid out: test_<module>.py holds the unit tests of one module of l0sparse (core/,
training/, cli, sklearn: test_sparsify.py for l0sparse.core.sparsify, test_runs.py for l0sparse.training.runs ...),
test_hf_<part>.py those of l0sparse.hf; the other files check behaviour end to end (the command's runs, bad input, scale,
devices, the docs). Helpers to import: models.py (small models, the patterns sparsify and prune must handle, the checks
made on them, the tiny BERT's sizes) and configs.py (the digits recipe, shortened). ``@pytest.mark.slow`` (pyproject.toml)
marks what ``make test-fast`` leaves out."""

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))  # tests/models.py, tests/configs.py


@pytest.fixture(scope="session")
def torch_export_loaded():
    """torch.export's first call imports and sets up dynamo (about 3 s, once per process): pay it here, not in a test.
    A module that exports asks for it once: ``pytestmark = pytest.mark.usefixtures("torch_export_loaded")``."""
    torch.export.export(nn.Linear(2, 2), (torch.randn(1, 2),))


@pytest.fixture(scope="session")
def one_epoch_run(tmp_path_factory):
    """A digits MLP trained for one epoch to a FLOPs target (round_to=8). test_report_figures.py prunes it: copy it to
    change it."""
    from l0sparse.training.config import load_config
    from l0sparse.training.train import run_training

    from configs import RECIPES

    out = tmp_path_factory.mktemp("report") / "run"
    run_training(load_config(RECIPES / "mlp-digits.toml", ["epochs=1", "hidden=[24, 12]", "target=0.5", "round_to=8"]), out,
                 progress=False)
    return out
