"""What `l0sparse train` shows while it works (issue #29): a line per slow set-up step, a bar with the task loss and the
size kept against the target on a terminal, a line every N steps elsewhere, and no transformers loading report."""

import io
from pathlib import Path

import pytest

from l0sparse.cli import main
from l0sparse.training.config import load_config
from l0sparse.training.regularizers import Regularizer
from l0sparse.training.train import StepProgress, run_training

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


class Sized(Regularizer):
    """A regularizer whose progress values are fixed: what the bar and the lines must show."""

    def progress(self) -> dict[str, str]:
        return {"flops_kept": "50.0%", "target": "60.0%"}


def run_steps(progress: StepProgress, losses: list[float]) -> None:
    for step, _ in enumerate(progress.batches(0, losses), 1):
        progress(step, losses[step - 1])
    progress.close()


def test_without_a_terminal_a_line_every_n_steps_with_the_mean_task_loss_and_the_size():
    stream = io.StringIO()
    run_steps(StepProgress(Sized(), total_epochs=2, steps_per_epoch=7, terminal=False, every=3, stream=stream),
              [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
    lines = stream.getvalue().splitlines()
    assert [line.split(":")[0] for line in lines] == ["epoch 1/2 step 3/7", "epoch 1/2 step 6/7", "epoch 1/2 step 7/7"]
    assert "task_loss 2.0000, flops_kept 50.0%, target 60.0%" in lines[0]  # the mean of steps 1-3
    assert "task_loss 5.0000" in lines[1] and "task_loss 7.0000" in lines[2]
    assert "\r" not in stream.getvalue()


def test_on_a_terminal_the_bar_shows_the_task_loss_and_the_size_against_the_target():
    stream = io.StringIO()
    run_steps(StepProgress(Sized(), total_epochs=1, steps_per_epoch=4, terminal=True, interval=0.0, stream=stream),
              [0.5, 0.25, 0.125, 0.0625])
    shown = stream.getvalue()
    assert "epoch 1/1" in shown and "task_loss=0.0625" in shown and "flops_kept=50.0%" in shown and "target=60.0%" in shown
    assert "step 4/4" not in shown  # a bar, not the lines


def test_disabled_progress_shows_nothing():
    stream = io.StringIO()
    run_steps(StepProgress(Sized(), total_epochs=1, steps_per_epoch=2, enabled=False, terminal=False, every=1, stream=stream), [1.0, 2.0])
    assert stream.getvalue() == ""


@pytest.mark.parametrize("every", [0, -1, 2.5])
def test_log_every_must_be_a_positive_int(every, tmp_path):
    with pytest.raises(ValueError, match="log_every must be an int >= 1"):
        run_training(load_config(RECIPES / "mlp-digits.toml"), tmp_path / "run", log_every=every)
    assert not (tmp_path / "run").exists()


def test_the_command_refuses_log_every_0_naming_the_option(capsys):
    with pytest.raises(SystemExit):
        main(["train", str(RECIPES / "mlp-digits.toml"), "--log-every", "0"])
    assert "argument --log-every: must be an int >= 1, got 0" in capsys.readouterr().err


def test_a_target_run_says_each_set_up_step_and_logs_the_controller_s_size(tmp_path, capsys):
    config = load_config(RECIPES / "mlp-digits.toml", ["epochs=1", "hidden=[16]", "target=0.5", "batch_size=100"])
    run_training(config, tmp_path / "run", log_every=5)
    err = capsys.readouterr().err
    assert "loading the data (digits) ...\nbuilding the model (mlp, regularizer l0) ...\n" in err
    lines = [line for line in err.splitlines() if line.startswith("epoch 1/1 step ")]
    assert [line.split(":")[0] for line in lines] == ["epoch 1/1 step 5/14", "epoch 1/1 step 10/14", "epoch 1/1 step 14/14"]
    assert all("flops_kept " in line and "target " in line for line in lines)
    assert lines[-1].split("target ")[1].startswith("50.0%")  # the schedule has reached the target by the epoch's end


@pytest.mark.slow
def test_a_distilled_text_run_says_it_computes_the_teacher_s_logits(tmp_path, capsys, monkeypatch):
    pytest.importorskip("transformers", reason="the Hugging Face tests need the 'hf' extra (make hf)")
    import test_hf_task
    from l0sparse import hf
    from l0sparse.training.data import DATASETS

    monkeypatch.setitem(DATASETS, "wordnet", test_hf_task.fake_wordnet)
    monkeypatch.setattr(hf.task, "build_minilm", test_hf_task.tiny_classifier)  # the harness builds MiniLM through hf.task
    run_training(test_hf_task.config(regularizer="none"), tmp_path / "teacher", progress=False)
    capsys.readouterr()
    run_training(test_hf_task.config(regularizer="importance", target=0.5, teacher=str(tmp_path / "teacher")), tmp_path / "imp")
    err = capsys.readouterr().err
    steps = ["loading the data (wordnet)", "loading the teacher", "building the model (minilm, regularizer importance)",
             "scoring the heads and units on 96 training examples", "the teacher's logits for the 96 training examples"]
    positions = [err.find(step) for step in steps]
    assert -1 not in positions and positions == sorted(positions), err


def test_the_packaged_model_loads_without_transformers_report_and_its_settings_are_restored(monkeypatch):
    transformers = pytest.importorskip("transformers", reason="the Hugging Face tests need the 'hf' extra (make hf)")
    import test_hf_task
    from l0sparse import hf

    logging = transformers.utils.logging
    logging.enable_progress_bar()
    logging.set_verbosity_warning()
    seen = []

    def from_pretrained(*args, **keys):
        seen.append((logging.is_progress_bar_enabled(), logging.get_verbosity()))
        return test_hf_task.tiny_classifier().encoder

    monkeypatch.setattr(hf.task, "minilm_path", lambda: Path("unused"))  # build_minilm reads it from hf.task
    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", from_pretrained)
    hf.build_minilm(3)
    assert seen == [(False, logging.ERROR)]  # the "Loading weights" bar and the load report are off while it loads
    assert logging.is_progress_bar_enabled() and logging.get_verbosity() == logging.WARNING  # and the user's settings back
