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
