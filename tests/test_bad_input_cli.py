"""Issue #14: bad input to the command line gets one line on stderr naming the path or key and what to do,
exit code 2, no traceback, and nothing of an earlier run is lost."""

import gzip
import json
import math
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

import l0sparse.training.data
import l0sparse.training.runs
import l0sparse.training.train
from l0sparse.cli import main
from l0sparse.training.config import load_config
from l0sparse.training.data import load_digits_split
from l0sparse.training.train import TrainingDiverged, run_training
from l0sparse.training.runs import CHECKPOINT, CONFIG_FILE, METRICS_FILE, PRUNED_SPEC, PRUNED_WEIGHTS, REPLACED_DIR, STAGING_DIR, load_pruned, prune_run

ROOT = Path(__file__).resolve().parents[1]
DIGITS = str(ROOT / "recipes" / "mlp-digits.toml")
QUICK = ["--set", "epochs=1", "--set", "hidden=[16]", "--no-progress"]


def quick_config(**overrides):
    return load_config(DIGITS, ["epochs=1", "hidden=[16]"] + [f"{key}={json.dumps(value)}" for key, value in overrides.items()])


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A one-epoch digits run, trained once; each test works on its own copy."""
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("trained") / "run"
    run_training(quick_config(), run, progress=False)
    return run


@pytest.fixture
def run(trained_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(trained_run, copy)
    return copy


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- how each case damages its inputs --------------------------------------------------------------------------

def write_file(tmp, run, monkeypatch):
    (tmp / "file").write_text("not a folder")


def empty_checkpoint(tmp, run, monkeypatch):
    (run / CHECKPOINT).write_bytes(b"")


def truncate_checkpoint(tmp, run, monkeypatch):
    data = (run / CHECKPOINT).read_bytes()
    (run / CHECKPOINT).write_bytes(data[: len(data) // 2])


def foreign_checkpoint(tmp, run, monkeypatch):
    torch.save([torch.ones(2)], run / CHECKPOINT)


def unknown_key_in_config_json(tmp, run, monkeypatch):
    config = json.loads((run / CONFIG_FILE).read_text())
    (run / CONFIG_FILE).write_text(json.dumps({**config, "colour": "red"}))


def config_json_not_json(tmp, run, monkeypatch):
    (run / CONFIG_FILE).write_text('{"model": "mlp", ')


def bad_toml(tmp, run, monkeypatch):
    (tmp / "bad.toml").write_text("epochs = = 3\n")


def other_toml(tmp, run, monkeypatch):
    (tmp / "other.toml").write_text(Path(DIGITS).read_text().replace("lam = 0.2", "lam = 3.0"))


def damaged_metrics_line(tmp, run, monkeypatch):
    lines = (run / METRICS_FILE).read_text().splitlines()
    (run / METRICS_FILE).write_text("\n".join(["{not json", *lines]) + "\n")


def corrupt_fashion_mnist(tmp, run, monkeypatch):
    folder = tmp / "fashion-mnist"
    folder.mkdir()
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (folder / name).write_bytes(gzip.compress(b"\x00\x00\x08\x03" + bytes(100))[:-9])  # cut short: no CRC
    monkeypatch.setattr(l0sparse.training.data, "FASHION_MNIST_DIR", str(folder))


def resumed_to_epoch_2(tmp, run, monkeypatch):
    run_training(quick_config(epochs=2), run, resume=True, progress=False)


def dense_run(tmp, run, monkeypatch):
    run_training(quick_config(regularizer="none", lam=0.1, gate_lr="none"), tmp / "dense", progress=False)


def config_json_of_another_model(tmp, run, monkeypatch):
    config = json.loads((run / CONFIG_FILE).read_text())
    (run / CONFIG_FILE).write_text(json.dumps({**config, "hidden": [8]}))


def finished_magnitude_run(tmp, run, monkeypatch):
    run_training(quick_config(regularizer="magnitude", target=0.3), tmp / "magnitude", progress=False)


# (description, prepare, argv with {run} and {tmp}, a fragment of the one-line error)
CASES = [
    ("--out names a file", write_file, ["train", DIGITS, *QUICK, "--out", "{tmp}/file"], "file is a file, not a folder"),
    ("--out inside a file", write_file, ["train", DIGITS, *QUICK, "--out", "{tmp}/file/run"], "file is a file, not a folder"),
    ("delay and warmup past the run", None, ["train", DIGITS, *QUICK, "--set", "target=0.5", "--set", "delay=0.6", "--set", "warmup=0.5",
                                             "--out", "{tmp}/out"], "'delay' = 0.6 and 'warmup' = 0.5"),
    ("delay without a target", None, ["train", DIGITS, *QUICK, "--set", "delay=0.2", "--out", "{tmp}/out"], "'delay' = 0.2: delays the target"),
    ("delay not a fraction", None, ["train", DIGITS, *QUICK, "--set", "delay=-0.1", "--out", "{tmp}/out"], "'delay' = -0.1: must be a fraction"),
    ("landing without a target", None, ["train", DIGITS, *QUICK, "--set", "landing='target'", "--out", "{tmp}/out"],
     "'landing' = 'target': says when the target controller"),
    ("landing not a choice", None, ["train", DIGITS, *QUICK, "--set", "target=0.5", "--set", "landing='end'", "--out", "{tmp}/out"],
     "'landing' = 'end': must be one of"),
    ("TOML syntax error", bad_toml, ["train", "{tmp}/bad.toml", "--out", "{tmp}/out"], "bad.toml is not valid TOML"),
    ("empty checkpoint, resume", empty_checkpoint, ["train", "--resume", "--out", "{run}", "--no-progress"], "checkpoint.pt cannot be loaded"),
    ("truncated checkpoint, prune", truncate_checkpoint, ["prune", "{run}"], "checkpoint.pt cannot be loaded"),
    ("truncated checkpoint, report", truncate_checkpoint, ["report", "{run}", "--out", "{tmp}/report"], "checkpoint.pt cannot be loaded"),
    ("a list saved as checkpoint", foreign_checkpoint, ["prune", "{run}"], "is not an l0sparse training checkpoint"),
    ("unknown key in config.json, resume", unknown_key_in_config_json, ["train", "--resume", "--out", "{run}"],
     "config.json: unknown config key 'colour'"),
    ("unknown key in config.json, prune", unknown_key_in_config_json, ["prune", "{run}"], "config.json: unknown config key 'colour'"),
    ("config.json not JSON, report", config_json_not_json, ["report", "{run}", "--out", "{tmp}/report"], "config.json is not valid JSON"),
    ("config.json not JSON, resume", config_json_not_json, ["train", "--resume", "--out", "{run}"], "config.json is not valid JSON"),
    ("damaged line inside metrics.jsonl", damaged_metrics_line, ["report", "{run}", "--out", "{tmp}/report"],
     "metrics.jsonl line 1 is not a metrics record"),
    ("--resume with another lam", None, ["train", "--resume", "--out", "{run}", "--set", "lam=50"], "lam (0.2 -> 50.0)"),
    ("--resume with another config file", other_toml, ["train", "{tmp}/other.toml", "--resume", "--out", "{run}"], "lam (0.2 -> 3.0)"),
    ("--resume with fewer epochs than done", resumed_to_epoch_2, ["train", "--resume", "--out", "{run}", "--set", "epochs=1"],
     "the checkpoint already holds epoch 2"),
    ("checkpoint of another model", config_json_of_another_model, ["prune", "{run}"], "does not fit the model that config.json describes"),
    ("diverging learning rates", None, ["train", DIGITS, *QUICK, "--set", "lr=1e30", "--set", "gate_lr=1e30", "--out", "{tmp}/nan"],
     "training diverged at epoch 1, step"),
    ("diverging demo", None, ["demo", "--epochs", "2", "--lr", "1e30", "--no-progress"], "the loss is nan at epoch"),
    ("corrupt Fashion-MNIST archive", corrupt_fashion_mnist,
     ["train", DIGITS, *QUICK, "--set", "data='fashion-mnist'", "--out", "{tmp}/out"], "train-images-idx3-ubyte.gz is damaged"),
    # issue #27: keys a run would record in config.json and never read (each accepted silently before)
    *[(f"{key} never read ({why})", None, ["train", DIGITS, *QUICK, *sets, "--set", f"{key}={value}", "--out", "{tmp}/out"],
       f"config key '{key}' = ")
      for key, value, why, sets in [
          ("target", "0.5", "none", ["--set", "regularizer='none'", "--set", "lam=0.1", "--set", "gate_lr='none'"]),
          ("target", "0.5", "l1", ["--set", "regularizer='l1'", "--set", "gate_lr='none'"]),
          ("target", "0.5", "l2", ["--set", "regularizer='l2'", "--set", "gate_lr='none'"]),
          ("threshold", "0.01", "l0", []),
          ("controller_lr", "0.1", "no target", []),
          ("warmup", "0.2", "no target", []),
          ("metric", "'params'", "no target", []),
          ("lam", "0.5", "exact target", ["--set", "target=0.5"]),
          ("lam", "0.5", "none", ["--set", "regularizer='none'", "--set", "gate_lr='none'"]),
          ("gate_lr", "0.05", "none", ["--set", "regularizer='none'", "--set", "lam=0.1"]),
          ("clamp_log_alpha", "true", "none", ["--set", "regularizer='none'", "--set", "lam=0.1", "--set", "gate_lr='none'"]),
          ("per_example_noise", "false", "gates = weights", ["--set", "gates='weights'"]),
      ]],
    # issue #27: messages that did not name the input (an allocator error, "Overflow when unpacking long long",
    # train_test_split's random_state, 1,800 threads started before a message about the run folder)
    ("a hidden width beyond memory", None, ["train", DIGITS, *QUICK, "--set", "hidden=[10000000000000]", "--out", "{tmp}/out"],
     "config key 'hidden' = [10000000000000]: must be a list of positive ints of at most 16777216"),
    ("a bool hidden width", None, ["train", DIGITS, *QUICK, "--set", "hidden=[true]", "--out", "{tmp}/out"], "config key 'hidden' = [True]"),
    ("a seed past int64", None, ["train", DIGITS, *QUICK, "--set", "seed=100000000000000000000", "--out", "{tmp}/out"],
     "config key 'seed' = 100000000000000000000: must be an int in [0, 4294967295]"),
    ("a batch_size past int64", None, ["train", DIGITS, *QUICK, "--set", "batch_size=100000000000000000000", "--out", "{tmp}/out"],
     "config key 'batch_size' = 100000000000000000000"),
    ("prune of a run without gates", dense_run, ["prune", "{tmp}/dense"], "is a run without gates (regularizer = 'none'): there is nothing to prune"),
    ("extending a finished magnitude run", finished_magnitude_run, ["train", "--resume", "--out", "{tmp}/magnitude", "--set", "epochs=2"],
     "this magnitude run prunes after epoch 1"),
]


@pytest.mark.parametrize("description, prepare, argv, fragment", CASES, ids=[case[0] for case in CASES])
def test_bad_input_gets_one_line_and_exit_code_2(description, prepare, argv, fragment, run, tmp_path, monkeypatch, capsys):
    torch.set_num_threads(1)
    if prepare is not None:
        prepare(tmp_path, run, monkeypatch)
        capsys.readouterr()  # what preparing printed
    code = main([part.format(run=run, tmp=tmp_path) for part in argv])
    stderr = capsys.readouterr().err
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2, stderr
    assert len(lines) == 1 and lines[0].startswith(f"l0sparse {argv[0]}: error: "), stderr
    assert fragment in lines[0], lines[0]
    assert "weights_only=False" not in lines[0]


def test_keys_a_run_never_reads_are_refused_from_a_file_but_a_recipe_may_change_regularizer(tmp_path):
    """Issue #27: a TOML file that sets a key its run never reads is refused, naming the key; a recipe's L0 keys stay
    quiet when --set changes its regularizer (the documented dense and magnitude baselines), but a key given with
    --set is checked; a resumed run's saved keys are not (older run folders still load)."""
    (tmp_path / "dense.toml").write_text('regularizer = "none"\ndata = "digits"\nlam = 0.3\n')
    with pytest.raises(ValueError, match="config key 'lam' = 0.3 would never be read by this run: regularizer 'none' has no λ"):
        load_config(tmp_path / "dense.toml")
    assert load_config(DIGITS, ["regularizer='none'"]).lam == 0.2  # the recipe's own λ, unread and accepted
    with pytest.raises(ValueError, match="config key 'gate_lr'"):
        load_config(DIGITS, ["regularizer='none'", "gate_lr=0.5"])
    saved = {**load_config(DIGITS).to_dict(), "regularizer": "none"}
    assert load_config(None, ["epochs=3"], base=saved).epochs == 3


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_config_path_that_is_a_fifo_is_refused_at_once(tmp_path, capsys):
    """Issue #27, the hang: a FIFO with no writer blocked `train` forever. Run in a subprocess with a timeout, so a
    regression fails instead of hanging the suite."""
    os.mkfifo(tmp_path / "config.toml")
    completed = subprocess.run([sys.executable, "-m", "l0sparse", "train", str(tmp_path / "config.toml"), "--out", str(tmp_path / "out")],
                               capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert completed.returncode == 2
    assert "config.toml is not a regular file (a FIFO" in completed.stderr


def test_load_pruned_of_a_per_weight_run_and_of_an_edited_pruned_json(tmp_path):
    """Issue #27: load_pruned of a `gates = weights` run built the paper's layers and failed with a KeyError; a
    hand-edited pruned.json without num_classes too."""
    run = tmp_path / "weights"
    run_training(quick_config(gates="weights"), run, progress=False)
    prune_run(run)
    _, gated, data = l0sparse.training.runs.load_run(run)
    with torch.no_grad():
        assert torch.equal(load_pruned(run)(data.x_test[:4]), gated(data.x_test[:4]))
    spec = json.loads((run / PRUNED_SPEC).read_text())
    del spec["num_classes"]
    (run / PRUNED_SPEC).write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="'num_classes' must be a positive int and 'plan' a prune plan; was it edited"):
        load_pruned(run)


@pytest.mark.slow
def test_the_command_prints_no_traceback(tmp_path):
    (tmp_path / "file").write_text("")
    completed = subprocess.run([sys.executable, "-m", "l0sparse", "train", DIGITS, "--out", str(tmp_path / "file")],
                               capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert completed.returncode == 2
    assert "Traceback" not in completed.stderr and completed.stderr.count("\n") == 1, completed.stderr


# --- item 1: `train --force` replaces a run only once the new one has its first checkpoint ----------------------

def test_force_keeps_the_old_run_when_the_new_one_cannot_load_its_data(run, tmp_path, monkeypatch):
    before = snapshot(run)
    monkeypatch.setattr(l0sparse.training.data, "FASHION_MNIST_DIR", str(tmp_path / "nowhere"))
    assert main(["train", DIGITS, *QUICK, "--set", "data='fashion-mnist'", "--force", "--out", str(run)]) == 2
    assert snapshot(run) == before


def test_force_keeps_the_old_run_when_the_first_epoch_diverges(run, capsys):
    before = snapshot(run)
    assert main(["train", DIGITS, *QUICK, "--set", "lr=1e30", "--set", "gate_lr=1e30", "--force", "--out", str(run)]) == 2
    assert "is untouched" in capsys.readouterr().err
    assert snapshot(run) == before


def test_force_refuses_a_folder_that_is_not_a_run_and_deletes_nothing(tmp_path, capsys):
    """Issue #27, data loss: a folder with the user's own config.json and report/ but no checkpoint.pt; before, --force
    deleted both."""
    folder = tmp_path / "mine"
    (folder / "report").mkdir(parents=True)
    (folder / "report" / "notes.md").write_text("mine")
    (folder / CONFIG_FILE).write_text('{"mine": true}')
    before = snapshot(folder)
    assert main(["train", DIGITS, *QUICK, "--force", "--out", str(folder)]) == 2
    error = capsys.readouterr().err
    assert "is not an l0sparse run (it has no checkpoint.pt) but holds config.json, report" in error
    assert snapshot(folder) == before


def test_an_empty_out_is_an_error_and_the_default_run_stays(tmp_path, monkeypatch, capsys):
    """Issue #27, data loss: `--out ""` (an unset $OUT) was taken as no --out and, with --force, replaced the default
    run runs/<config name>."""
    monkeypatch.chdir(tmp_path)
    default = tmp_path / "runs" / "mlp-digits"
    default.mkdir(parents=True)
    (default / CHECKPOINT).write_bytes(b"the default run")
    for argv in (["train", DIGITS, *QUICK, "--force", "--out", ""], ["train", "--resume", "--out", " "],
                 ["report", str(default), "--out", ""]):
        assert main(argv) == 2
        assert "--out is empty" in capsys.readouterr().err
    assert (default / CHECKPOINT).read_bytes() == b"the default run"
    with pytest.raises(ValueError, match="out_dir"):
        run_training(quick_config(), "", force=True, progress=False)


def test_failed_set_up_of_a_new_run_leaves_no_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(l0sparse.training.data, "FASHION_MNIST_DIR", str(tmp_path / "nowhere"))
    assert main(["train", DIGITS, *QUICK, "--set", "data='fashion-mnist'", "--out", str(tmp_path / "new")]) == 2
    assert not (tmp_path / "new").exists()


# --- item 2: nothing of the replaced run survives ---------------------------------------------------------------

def test_force_removes_the_replaced_runs_pruned_model_and_report(run):
    prune_run(run)
    assert main(["report", str(run)]) == 0
    assert (run / PRUNED_WEIGHTS).exists() and (run / PRUNED_SPEC).exists() and (run / "report" / "report.md").exists()
    (run / "notes.txt").write_text("the user's own file")
    assert main(["train", DIGITS, *QUICK, "--set", "epochs=2", "--force", "--out", str(run)]) == 0
    assert torch.load(run / CHECKPOINT, weights_only=True)["epoch"] == 2
    assert sorted(p.name for p in run.iterdir()) == sorted([CHECKPOINT, CONFIG_FILE, METRICS_FILE, "notes.txt"])
    assert not (run / STAGING_DIR).exists() and not (run / REPLACED_DIR).exists()
    with pytest.raises(FileNotFoundError, match="l0sparse prune"):
        load_pruned(run)


# --- item 3: a non-finite loss stops training, the last good checkpoint stays -----------------------------------

def test_divergence_after_a_good_epoch_keeps_its_checkpoint(tmp_path, monkeypatch):
    cross_entropy = torch.nn.functional.cross_entropy
    epochs_done = []

    def nan_from_epoch_2(*args, **kwargs):
        loss = cross_entropy(*args, **kwargs)
        return loss * float("nan") if epochs_done else loss

    monkeypatch.setattr(l0sparse.training.train.F, "cross_entropy", nan_from_epoch_2)
    with pytest.raises(TrainingDiverged, match=r"epoch 2, step 1 of \d+: the loss is nan; .*checkpoint.pt keeps epoch 1"):
        run_training(quick_config(epochs=3), tmp_path / "run", progress=False, on_epoch_end=epochs_done.append)
    assert torch.load(tmp_path / "run" / CHECKPOINT, weights_only=True)["epoch"] == 1
    assert len((tmp_path / "run" / METRICS_FILE).read_text().splitlines()) == 1


def test_weights_broken_by_the_last_step_are_not_saved(tmp_path, monkeypatch):
    step, calls = torch.optim.Adam.step, []
    steps_per_epoch = math.ceil(len(load_digits_split().y_train) / 64)  # the recipe's batch_size

    def breaking_step(self, *args, **kwargs):  # every loss finite; the epoch's last update leaves inf in the weights
        result = step(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == steps_per_epoch:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("inf"))
        return result

    monkeypatch.setattr(torch.optim.Adam, "step", breaking_step)
    with pytest.raises(TrainingDiverged, match=rf"epoch 1, step {steps_per_epoch} of {steps_per_epoch}: .* holds NaN or inf after "
                                               "the optimizer step; no checkpoint was written"):
        run_training(quick_config(), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


# --- item 4: --resume applies only epochs, says so, and config.json describes what ran --------------------------

def test_resume_with_more_epochs_updates_config_json(run, capsys):
    assert main(["train", "--resume", "--out", str(run), "--set", "epochs=2", "--no-progress"]) == 0
    assert "epochs = 2 (config.json said 1)" in capsys.readouterr().err
    assert json.loads((run / CONFIG_FILE).read_text())["epochs"] == 2
    assert torch.load(run / CHECKPOINT, weights_only=True)["config"]["epochs"] == 2
    assert [json.loads(line)["epoch"] for line in (run / METRICS_FILE).read_text().splitlines()] == [1, 2]


def test_resume_with_the_same_config_file_is_accepted(run):
    assert main(["train", DIGITS, "--resume", "--out", str(run), "--set", "hidden=[16]", "--set", "epochs=2", "--no-progress"]) == 0


# --- item 7: report says "unknown" for a figure a run did not record --------------------------------------------

def test_report_does_not_invent_params_kept(tmp_path):
    for name, overrides in {"magnitude": dict(regularizer="magnitude", target=0.3), "l1": dict(regularizer="l1", lam=1.0),
                            "dense": dict(regularizer="none")}.items():
        run_training(quick_config(**overrides), tmp_path / name, progress=False)
    assert main(["report", *(str(tmp_path / name) for name in ("magnitude", "l1", "dense")), "--out", str(tmp_path / "report")]) == 0
    table = [line.strip("| ").split(" | ") for line in (tmp_path / "report" / "report.md").read_text().splitlines() if line.startswith("|")]
    header = table[0]
    rows = {cells[0]: dict(zip(header, cells)) for cells in table[2:]}
    kept = ("% params kept", "% FLOPs kept")
    assert rows["magnitude"]["% params kept"] == "unknown" and rows["magnitude"]["% FLOPs kept"] != "unknown"  # it records FLOPs only
    assert [rows["l1"][column] for column in kept] == ["unknown", "unknown"]
    assert [rows["dense"][column] for column in kept] == ["100.0%", "100.0%"]
    assert rows["dense"]["accuracy after prune"] == "not pruned" and rows["dense"]["speed-up"] == "-"


# --- item 15: a partial last line of metrics.jsonl does not block resume or report ------------------------------

def test_partial_last_metrics_line_is_dropped(run, tmp_path):
    with open(run / METRICS_FILE, "a") as handle:
        handle.write('{"epoch": 2, "train_lo')  # kill -9 in the middle of a write
    assert main(["report", str(run), "--out", str(tmp_path / "report")]) == 0
    assert main(["train", "--resume", "--out", str(run), "--set", "epochs=2", "--no-progress"]) == 0
    assert [json.loads(line)["epoch"] for line in (run / METRICS_FILE).read_text().splitlines()] == [1, 2]


# --- issue #27: resume and report agree with the checkpoint, whatever happened to metrics.jsonl and config.json ---

def epochs_in(path: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in path.read_text().splitlines()]


@pytest.fixture
def run_at_epoch_2(run):
    """The run resumed to epoch 2: its checkpoint keeps a copy of the history (new in #27)."""
    run_training(quick_config(epochs=2), run, resume=True, progress=False)
    assert epochs_in(run / METRICS_FILE) == [1, 2]
    return run


def test_a_partial_last_metrics_line_is_restored_from_the_checkpoint(run_at_epoch_2, tmp_path, capsys):
    """Before: the checkpoint held epoch 2, metrics.jsonl epoch 1 and a partial line; report ended at epoch 1 and a
    resume left epochs [1, 3]."""
    run = run_at_epoch_2
    lines = (run / METRICS_FILE).read_text().splitlines()
    (run / METRICS_FILE).write_text(lines[0] + "\n" + lines[1][:20])  # kill -9 in the middle of epoch 2's line
    with pytest.warns(UserWarning, match="restored from it"):
        assert main(["report", str(run), "--out", str(tmp_path / "report")]) == 0
    assert "| 2 |" in (tmp_path / "report" / "report.md").read_text()  # the epochs column: the checkpoint's epoch
    assert main(["train", "--resume", "--out", str(run), "--set", "epochs=3", "--no-progress"]) == 0
    assert "lacked records of epochs 1-2 that the checkpoint holds: restored from it" in capsys.readouterr().err
    assert epochs_in(run / METRICS_FILE) == [1, 2, 3]


@pytest.mark.parametrize("damage", ["missing", "empty"])
def test_a_lost_metrics_file_is_restored_on_resume_and_said_so(run_at_epoch_2, damage, capsys):
    """Before: resumed without a word, the history of epochs 1-2 gone."""
    run = run_at_epoch_2
    if damage == "missing":
        (run / METRICS_FILE).unlink()
    else:
        (run / METRICS_FILE).write_text("")
    assert main(["train", "--resume", "--out", str(run), "--set", "epochs=3", "--no-progress"]) == 0
    assert "restored from it" in capsys.readouterr().err
    assert epochs_in(run / METRICS_FILE) == [1, 2, 3]


def test_a_lost_history_that_the_checkpoint_cannot_restore_is_named(run, capsys):
    """A checkpoint written before #27 keeps no history: the lost epochs are named instead of passed over."""
    state = torch.load(run / CHECKPOINT, weights_only=True)
    del state["history"]
    torch.save(state, run / CHECKPOINT)
    (run / METRICS_FILE).unlink()
    assert main(["train", "--resume", "--out", str(run), "--set", "epochs=2", "--no-progress"]) == 0
    assert "has no record of epoch(s) 1, which the checkpoint holds: that history is lost" in capsys.readouterr().err


def test_report_drops_a_metrics_line_past_the_checkpoint(run, tmp_path):
    """Before: report showed epoch 2's accuracy beside epoch 1's gates (the line written just before a kill)."""
    record = json.loads((run / METRICS_FILE).read_text().splitlines()[0])
    with open(run / METRICS_FILE, "a") as handle:
        handle.write(json.dumps({**record, "epoch": 2, "test_accuracy": 0.0}) + "\n")
    with pytest.warns(UserWarning, match=r"records past the checkpoint's epoch 1 \(epochs 2\): dropped"):
        assert main(["report", str(run), "--out", str(tmp_path / "report")]) == 0
    assert "| 1 | " in (tmp_path / "report" / "report.md").read_text() and "0.00%" not in (tmp_path / "report" / "report.md").read_text()


def test_an_edited_config_json_is_refused_on_resume(run, capsys):
    """Before: lr edited in config.json, --resume trained at the checkpoint's lr (the optimizer's state) while
    config.json said otherwise."""
    config = json.loads((run / CONFIG_FILE).read_text())
    (run / CONFIG_FILE).write_text(json.dumps({**config, "lr": 0.05}))
    before = snapshot(run)
    assert main(["train", "--resume", "--out", str(run), "--set", "epochs=2", "--no-progress"]) == 2
    assert "lr (0.01 in checkpoint.pt, 0.05 in config.json)" in capsys.readouterr().err
    assert snapshot(run) == before


@pytest.mark.parametrize("edit, fragment", [(lambda state: state.pop("optimizer"), "has no optimizer"),
                                            (lambda state: state.pop("rng"), "has no rng"),
                                            (lambda state: state.update(epoch=1.5), "holds epoch 1.5, not a whole number")])
def test_a_checkpoint_that_cannot_be_resumed_is_named(run, edit, fragment, capsys):
    """Before: KeyError: 'optimizer' / 'rng', or a float epoch taken as it was."""
    state = torch.load(run / CHECKPOINT, weights_only=True)
    edit(state)
    torch.save(state, run / CHECKPOINT)
    assert main(["train", "--resume", "--out", str(run), "--set", "epochs=2", "--no-progress"]) == 2
    error = capsys.readouterr().err
    assert fragment in error and "checkpoint.pt" in error and "Traceback" not in error


def test_report_names_runs_of_the_same_folder_name_apart(run, tmp_path):
    """Before: `report a/run b/run` named both rows "run"."""
    for parent in ("a", "b"):
        shutil.copytree(run, tmp_path / parent / "run")
    assert main(["report", str(tmp_path / "a" / "run"), str(tmp_path / "b" / "run"), "--out", str(tmp_path / "report")]) == 0
    rows = [line.split(" | ")[0].strip("| ") for line in (tmp_path / "report" / "report.md").read_text().splitlines()[2:4]]
    assert rows == ["a/run", "b/run"]


def test_report_names_a_record_without_its_keys(run, tmp_path, capsys):
    """Before: KeyError: 'test_accuracy'."""
    record = json.loads((run / METRICS_FILE).read_text().splitlines()[0])
    del record["test_accuracy"]
    (run / METRICS_FILE).write_text(json.dumps(record) + "\n")
    assert main(["report", str(run), "--out", str(tmp_path / "report")]) == 2
    assert "metrics.jsonl: the record of epoch 1 has no 'test_accuracy'" in capsys.readouterr().err


# --- item 14: an unwritable folder, and any OSError, is one line naming the path ---------------------------------

@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_parent_folder_is_named(tmp_path, capsys):
    (tmp_path / "locked").mkdir(mode=0o555)
    assert main(["train", DIGITS, *QUICK, "--out", str(tmp_path / "locked" / "run")]) == 2
    assert "locked is not writable" in capsys.readouterr().err


def test_an_os_error_while_writing_names_the_path(run, monkeypatch, capsys):
    def refuse(payload, path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(l0sparse.training.runs, "atomic_save", refuse)  # the run folder writes pruned.pt
    assert main(["prune", str(run)]) == 2
    assert capsys.readouterr().err.strip() == f"l0sparse prune: error: {run / PRUNED_WEIGHTS}: Permission denied"


def test_prune_of_a_read_only_run_is_refused_before_it_prunes(run, monkeypatch, capsys):
    """Issue #27: prune on a read-only run ended in a raw error after pruning; os.access stands in for a read-only
    folder (root, which runs these tests here, writes into read-only folders)."""
    monkeypatch.setattr(l0sparse.training.runs.os, "access", lambda path, mode: Path(path) != run)
    assert main(["prune", str(run)]) == 2
    assert capsys.readouterr().err.strip() == (f"l0sparse prune: error: {run}: the run folder is read-only, and prune writes "
                                               "pruned.pt and pruned.json into it: copy the run somewhere writable, or make it writable")


def test_a_full_disk_during_a_checkpoint_write_names_the_file_and_keeps_the_old_run(run, monkeypatch, capsys):
    """Issue #27: the old run stayed intact, but the user got torch's RuntimeError ("PytorchStreamWriter failed
    writing file"). torch.save is made to fail as it does on ENOSPC."""
    before = snapshot(run)

    def no_space(payload, path, *args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file data/0: "
                           "file write failed")

    monkeypatch.setattr(torch, "save", no_space)
    assert main(["train", "--resume", "--out", str(run), "--set", "epochs=2", "--no-progress"]) == 2
    error = capsys.readouterr().err
    assert f"{run / CHECKPOINT}: could not write it" in error and "is the disk full? the previous file is untouched" in error
    assert snapshot(run)[CHECKPOINT] == before[CHECKPOINT]


# --- item 19: the declared lower bounds are those the code needs ------------------------------------------------

def test_declared_lower_bounds_cover_what_the_code_uses():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["requires-python"] == ">=3.11"  # tomllib
    assert "torch>=2.4" in project["dependencies"]  # fused Adam on the CPU
    sklearn_pins = [pin for extra in project["optional-dependencies"].values() for pin in extra if pin.startswith("scikit-learn")]
    assert sklearn_pins and set(sklearn_pins) == {"scikit-learn>=1.6"}  # sklearn.utils.validation.validate_data


@pytest.mark.parametrize("option, value, shown", [("--lr", "fast", "a number > 0, got 'fast'"), ("--lr", "0", "a number > 0, got 0"),
                                                  ("--lam", "much", "a number >= 0, got 'much'"), ("--lam", "-1", "a number >= 0, got -1"),
                                                  # issue #27: train_test_split was blamed for -1; 100000 threads were started
                                                  ("--seed", "-1", "an int in [0, 4294967295], got -1"),
                                                  ("--threads", "100000", f"at most this machine's {os.cpu_count()} cores, got 100000")])
def test_a_bad_number_option_names_the_option_and_what_it_must_be(option, value, shown, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", option, value, "--no-progress"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert f"argument {option}: must be {shown}" in error and "invalid" not in error
