"""l0sparse.training.runs: RunFolder's file names, and load / prune / load_pruned of what run_training wrote."""

import torch

from l0sparse.training.runs import load_run
from l0sparse.training.train import run_training

from configs import quick_config


def test_run_folder_owns_the_file_names_and_loads_what_run_training_wrote(tmp_path):
    from l0sparse.training.runs import RunFolder

    run_training(quick_config(epochs=1), tmp_path / "run", progress=False)
    run = RunFolder(tmp_path / "run")
    assert [p.name for p in (run.config_path, run.metrics_path, run.checkpoint_path, run.pruned_weights_path, run.pruned_spec_path,
                             run.teacher_logits_path, run.teacher_weights_path, run.report_path)] == \
        ["config.json", "metrics.jsonl", "checkpoint.pt", "pruned.pt", "pruned.json", "teacher_logits.pt", "teacher.pt", "report"]
    assert run.read_config() == quick_config(epochs=1)
    assert [record["epoch"] for record in run.read_metrics()] == [1] and run.read_checkpoint()["epoch"] == 1
    config, model, data = run.load()
    _, same_model, _ = load_run(tmp_path / "run", data=data)  # the function is the method
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), same_model.state_dict().values()))
    pruned, table = run.prune()
    assert "total" in table and run.pruned_weights_path.exists()
    with torch.no_grad():
        torch.testing.assert_close(run.load_pruned()(data.x_test), model(data.x_test))
    assert RunFolder(tmp_path / "new").read_metrics() == []  # no epoch finished yet
