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
