"""`l0sparse report` reads for any model (issue #29): one panel of kept fractions per kind of gate, markers for short
runs, and prune's accuracy and latency in report.md (short layer labels: test_plots.py). The run: conftest.py's
one_epoch_run."""

import json

import pytest

from l0sparse.cli import main
from l0sparse.training.runs import RunFolder

pytest.importorskip("matplotlib", reason="report needs the 'plot' extra")


def test_a_one_epoch_run_is_drawn_with_markers_and_its_gates_one_panel_per_kind(one_epoch_run, tmp_path, monkeypatch):
    import matplotlib.axes

    plotted, panels = [], []
    real_plot, real_bar = matplotlib.axes.Axes.plot, matplotlib.axes.Axes.bar

    def plot(self, *args, **keys):
        plotted.append((self.get_title(), keys.get("marker")))
        return real_plot(self, *args, **keys)

    def bar(self, positions, heights, *args, **keys):
        panels.append(list(heights))
        return real_bar(self, positions, heights, *args, **keys)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", plot)
    monkeypatch.setattr(matplotlib.axes.Axes, "bar", bar)
    assert main(["report", str(one_epoch_run), "--out", str(tmp_path / "report")]) == 0
    assert plotted and all(marker is not None for _, marker in plotted)  # one point per line: only a marker shows it
    # one kind of gate (inputs), two bars: the grey 100% and the kept fractions, in % (not counts); then the histogram's
    assert len(panels) == 3 and panels[0] == [100, 100, 100]
    assert all(0 <= height <= 100 for height in panels[1]) and panels[1] != panels[0]


def test_report_md_has_prune_s_accuracy_and_latency_once_the_run_is_pruned(one_epoch_run, tmp_path):
    assert main(["report", str(one_epoch_run), "--out", str(tmp_path / "before")]) == 0
    before = (tmp_path / "before" / "report.md").read_text()
    assert "| accuracy after prune | % FLOPs after prune | latency pruned / unpruned | speed-up |" in before
    assert "| not pruned | - | - | - |" in before

    assert main(["prune", str(one_epoch_run), "--force"]) == 0
    assert main(["report", str(one_epoch_run), "--out", str(tmp_path / "after")]) == 0
    row = (tmp_path / "after" / "report.md").read_text().splitlines()[2]  # the header, the rule, this run
    result = json.loads(RunFolder(one_epoch_run).pruned_spec_path.read_text())["result"]
    cells = row.strip("| ").split(" | ")
    assert cells[-4] == f"{100 * result['test_accuracy']:.2f}%" and cells[-3] == f"{100 * result['flops']['kept']:.1f}%"
    assert cells[-2].endswith(" ms") and " ms / " in cells[-2] and cells[-1] == f"{result['latency']['speedup']:.2f}×"


def test_runs_on_the_same_data_share_one_load_and_each_slow_step_is_announced(one_epoch_run, tmp_path, monkeypatch):
    import shutil

    import l0sparse.training.data
    from l0sparse.training.plots import report_runs

    second = tmp_path / "second"
    shutil.copytree(one_epoch_run, second)
    loads, real = [], l0sparse.training.data.load_dataset
    monkeypatch.setattr(l0sparse.training.data, "load_dataset", lambda name: loads.append(name) or real(name))
    said = []
    report_runs([one_epoch_run, second], tmp_path / "report", say=said.append)
    assert loads == ["digits"]  # MiniLM's runs would tokenize WordNet once, not once per run
    assert said[0] == f"{one_epoch_run.name}: its gates (the model and its data)" and said[1].startswith("loading the data")
    assert "second: its gates (the model and its data)" in said and sum(line.startswith("loading the data") for line in said) == 1
