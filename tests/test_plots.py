"""l0sparse.training.plots: report_runs writes the figures and report.md's table of run folders; short_labels."""

import shutil

import pytest

from l0sparse.training.plots import report_runs, short_labels
from l0sparse.training.runs import RunFolder

from configs import quick_config

pytest.importorskip("matplotlib", reason="report needs the 'plot' extra")

PNG = b"\x89PNG\r\n\x1a\n"
HEADER = ("| run | data | model | regularizer | λ / target | epochs | test accuracy | % params kept | % FLOPs kept "
          "| accuracy after prune | % FLOPs after prune | latency pruned / unpruned | speed-up |")


@pytest.mark.parametrize("names, labels, pattern", [
    (["encoder.encoder.layer.0.attention", "encoder.encoder.layer.1.attention"], ["0", "1"], "encoder.encoder.layer.*.attention"),
    (["encoder.encoder.layer.0.output.dense", "encoder.encoder.layer.11.output.dense"], ["0", "11"], "encoder.encoder.layer.*.output.dense"),
    (["layers.0", "layers.2", "layers.4"], ["0", "2", "4"], "layers.*"),
    (["conv1", "conv2"], ["conv1", "conv2"], ""),
    (["block.a.fc", "block.b.proj"], ["a.fc", "b.proj"], "block.*"),
    (["encoder.hidden"], ["hidden"], "encoder.hidden"),
])
def test_short_labels_drop_what_every_layer_name_shares(names, labels, pattern):
    assert short_labels(names) == (labels, pattern)


def write_run(folder, config, records):
    """A run folder as run_training leaves one without a checkpoint: config.json and metrics.jsonl, by RunFolder's writers."""
    folder.mkdir(parents=True)
    run = RunFolder(folder)
    run.write_config(config)
    run.write_metrics(records)
    return folder


def table(markdown: str) -> list[list[str]]:
    return [line.strip("| ").split(" | ") for line in markdown.splitlines() if line.startswith("|")]


def test_runs_without_gates_get_the_training_and_pareto_figures_and_a_row_each(tmp_path):
    dense = write_run(tmp_path / "dense", quick_config(regularizer="none", epochs=2),
                      [{"epoch": 1, "test_accuracy": 0.9}, {"epoch": 2, "test_accuracy": 0.925}])
    l1 = write_run(tmp_path / "l1", quick_config(regularizer="l1", lam=1.0, epochs=2),
                   [{"epoch": e, "test_accuracy": a, "weights_kept": w, "units_kept": u}
                    for e, a, w, u in ((1, 0.8, 0.6, 0.9), (2, 0.85, 0.5, 0.75))])
    magnitude = write_run(tmp_path / "magnitude", quick_config(regularizer="magnitude", target=0.3, epochs=1),
                          [{"epoch": 1, "test_accuracy": 0.7, "flops_kept": 1.0}, {"epoch": 2, "test_accuracy": 0.75, "flops_kept": 0.2861}])

    written = report_runs([dense, l1, magnitude], tmp_path / "report")

    # no gated run: no gates figure
    assert written == {name: tmp_path / "report" / file for name, file in
                       (("training", "training.png"), ("pareto", "pareto.png"), ("markdown", "report.md"))}
    for key in ("training", "pareto"):
        assert written[key].read_bytes().startswith(PNG)
    markdown = written["markdown"].read_text()
    assert markdown.splitlines()[0] == HEADER
    header, _, *rows = table(markdown)
    rows = {cells[0]: dict(zip(header, cells)) for cells in rows}
    assert list(rows) == ["dense", "l1", "magnitude"]  # in the order given
    assert {name: (row["data"], row["model"], row["regularizer"], row["λ / target"], row["epochs"], row["test accuracy"])
            for name, row in rows.items()} == {
        "dense": ("digits", "mlp", "none", "-", "2", "92.50%"),
        "l1": ("digits", "mlp", "l1", "λ = 1/N", "2", "85.00%"),
        "magnitude": ("digits", "mlp", "magnitude", "target 0.3 flops", "2", "75.00%")}
    # a dense run keeps everything; what a run did not measure is unknown, not invented
    assert [(row["% params kept"], row["% FLOPs kept"]) for row in rows.values()] == [
        ("100.0%", "100.0%"), ("unknown", "unknown"), ("unknown", "28.6%")]
    for row in rows.values():  # none of them pruned
        assert [row[column] for column in header[-4:]] == ["not pruned", "-", "-", "-"]
    assert markdown.rstrip().endswith("![training](training.png)\n![pareto](pareto.png)")


def test_a_gated_run_gets_the_gates_figure_and_its_target_in_the_table(one_epoch_run, tmp_path):
    run = shutil.copytree(one_epoch_run, tmp_path / "gated")
    said = []
    written = report_runs([run], tmp_path / "report", say=said.append)
    assert set(written) == {"training", "gates", "pareto", "markdown"}
    for key in ("training", "gates", "pareto"):
        assert written[key] == tmp_path / "report" / f"{key}.png" and written[key].read_bytes().startswith(PNG)
    assert said[0] == "gated: its gates (the model and its data)"
    header, _, row = table(written["markdown"].read_text())
    cells = dict(zip(header, row))
    last = RunFolder(run).read_metrics()[-1]
    assert (cells["run"], cells["regularizer"], cells["λ / target"], cells["epochs"]) == ("gated", "l0", "target 0.5 flops", "1")
    assert cells["% FLOPs kept"] == f"{100 * last['flops_kept']:.1f}%" and cells["test accuracy"] == f"{100 * last['test_accuracy']:.2f}%"
    assert "![gates](gates.png)" in written["markdown"].read_text()


def test_a_folder_that_is_not_a_run_is_refused_before_anything_is_written(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="is not a run directory: it has no metrics.jsonl"):
        report_runs([tmp_path / "empty"], tmp_path / "report")
    started = write_run(tmp_path / "started", quick_config(regularizer="none"), [])
    with pytest.raises(ValueError, match="has no completed epoch in metrics.jsonl"):
        report_runs([started], tmp_path / "report")
    edited = write_run(tmp_path / "edited", quick_config(regularizer="none"), [{"epoch": 1}])
    with pytest.raises(ValueError, match="the record of epoch 1 has no 'test_accuracy'"):
        report_runs([edited], tmp_path / "report")
    assert not (tmp_path / "report").exists()
