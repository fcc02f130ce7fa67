import io

from l0sparse.cli import main, run_demo


def test_demo_runs_end_to_end_on_a_short_budget():
    out = io.StringIO()
    result = run_demo(epochs=3, progress=False, out=out)
    text = out.getvalue()
    assert "64-100-50 -> " in text and "test accuracy" in text and "% of FLOPs" in text
    kept = [int(k) for k in result["architecture"].split(" -> ")[1].split("-")]
    assert len(kept) == 3 and all(0 <= k <= n for k, n in zip(kept, (64, 100, 50)))
    assert 0.0 <= result["flops_kept"] <= 1.0 and 0.0 <= result["params_kept"] <= 1.0
    # three epochs already learn the digits far above the 10% chance level
    assert result["accuracy_dense"] > 0.5 and result["accuracy_l0"] > 0.5


def test_demo_is_deterministic():
    first = run_demo(epochs=2, progress=False, out=io.StringIO())
    second = run_demo(epochs=2, progress=False, out=io.StringIO())
    for key in ("architecture", "accuracy_l0", "accuracy_dense", "expected_l0"):
        assert first[key] == second[key]


def test_demo_command_rejects_bad_arguments(capsys):
    import pytest

    with pytest.raises(SystemExit):
        main(["demo", "--epochs", "0"])
    assert "--epochs" in capsys.readouterr().err
