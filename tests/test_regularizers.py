"""l0sparse.training.regularizers: one object per regularizer (its loss term, after-step action, metrics, state)."""

import torch

from configs import quick_config


def test_each_regularizer_is_one_object_with_its_term_action_metrics_and_state():
    from l0sparse.training.build import model_for
    from l0sparse.training.data import load_dataset
    from l0sparse.training.regularizers import L0, L0WithTarget, LkPenalty, MagnitudePruning, Regularizer, regularizer_for

    data = load_dataset("digits")
    example = data.x_train[:2]
    expected = {"l0": (L0, {"flops_kept", "params_kept", "expected_l0", "expected_flops_kept"}),
                "target": (L0WithTarget, {"flops_kept", "expected_l0", "lambda_1", "lambda_2", "target_now"}),
                "l1": (LkPenalty, {"weights_kept", "units_kept"}), "magnitude": (MagnitudePruning, {"flops_kept"}),
                "none": (Regularizer, set())}
    configs = {"l0": quick_config(), "target": quick_config(target=0.5), "l1": quick_config(regularizer="l1", lam=1.0),
               "magnitude": quick_config(regularizer="magnitude", target=0.3), "none": quick_config(regularizer="none")}
    for name, config in configs.items():
        model = model_for(config, data)
        regularizer = regularizer_for(config, model, model, example, len(data.x_train), 5, list, torch.nn.functional.cross_entropy)
        kind, keys = expected[name]
        assert type(regularizer) is kind, name
        assert keys <= set(regularizer.metrics()), name
        task_loss = torch.nn.functional.cross_entropy(model(data.x_train[:8]), data.y_train[:8])
        loss = regularizer.loss(task_loss)
        assert (loss is task_loss) == (name in ("magnitude", "none")), name  # only the penalties add a term
        checkpoint = regularizer.checkpoint_state()
        assert set(checkpoint) == {"controller"} and (checkpoint["controller"] is None) == (name != "target")
        regularizer.load_checkpoint_state(checkpoint)
        assert regularizer.total_epochs(4) == (8 if name == "magnitude" else 4)


def test_settle_fixes_the_gates_as_prune_keeps_them_for_the_last_steps(tmp_path):
    """settle = 0.25: after 75% of the steps every gate is exactly open or shut, no longer trained, the controller's
    term gone; the run's pruned widths are the open gates, and a resumed run freezes them again."""
    from l0sparse.core.sites import find_gates
    from l0sparse.training.build import model_for
    from l0sparse.training.data import load_dataset
    from l0sparse.training.regularizers import regularizer_for

    data = load_dataset("digits")
    config = quick_config(target=0.5, warmup=0.5, settle=0.25)
    model = model_for(config, data)
    steps = 8
    regularizer = regularizer_for(config, model, model, data.x_train[:2], len(data.x_train), steps // config.epochs, list,
                                  torch.nn.functional.cross_entropy)
    assert regularizer.settle_step == 6  # (1 - 0.25) of 4 epochs x 2 steps
    task_loss = torch.tensor(1.0)
    for step in range(steps):
        assert regularizer.settled == (step >= 6)
        assert (regularizer.loss(task_loss) is task_loss) == (step >= 6 and regularizer.penalty is None)
        regularizer.after_step()
    for gate in find_gates(model):
        assert set(gate.log_alpha.unique().tolist()) <= {30.0, -30.0} and not gate.log_alpha.requires_grad
    fresh = model_for(config, data)
    fresh.load_state_dict(model.state_dict())
    resumed = regularizer_for(config, fresh, fresh, data.x_train[:2], len(data.x_train), steps // config.epochs, list,
                              torch.nn.functional.cross_entropy)
    resumed.load_checkpoint_state(regularizer.checkpoint_state())
    assert resumed.settled and not any(gate.log_alpha.requires_grad for gate in find_gates(fresh))


def test_settle_needs_an_l0_target_reached_before_it_starts():
    import pytest

    with pytest.raises(ValueError, match=r"config key 'settle' = 0.5: .*delay \+ warmup < 1 - settle"):
        quick_config(target=0.5, warmup=0.5, settle=0.5)  # fixed at the step the warm-up ends: before the landing
    with pytest.raises(ValueError, match=r"config key 'settle' = 0.2: .*regularizer = 'l0'"):
        quick_config(regularizer="none", settle=0.2)
    with pytest.raises(ValueError, match=r"config key 'settle' = 1: must be a fraction of the training steps in \[0, 1\)"):
        quick_config(settle=1)
