import math

import pytest
import torch
import torch.nn.functional as F

import l0sparse


def test_fit_clamps_log_alpha_where_the_gates_ask_and_gives_the_gates_their_lr():
    """fit takes run_training's steps: the clamp is each gate's own setting, and gate_lr reaches log α alone."""
    from l0sparse.training.data import load_digits_split

    data = load_digits_split()
    torch.manual_seed(0)
    clamped = l0sparse.L0MLP((64, 16, 10), clamp_log_alpha=l0sparse.PAPER_LOG_ALPHA_RANGE)
    l0sparse.training.train.fit(clamped, data.x_train, data.y_train, epochs=1, lr=0.2, lam=5.0, progress=False)
    low, high = l0sparse.PAPER_LOG_ALPHA_RANGE
    for gate in l0sparse.find_gates(clamped):
        assert low - 1e-6 <= float(gate.log_alpha.detach().min()) and float(gate.log_alpha.detach().max()) <= high + 1e-6
    torch.manual_seed(0)
    model = l0sparse.L0MLP((64, 16, 10))
    weights_before = [p.detach().clone() for name, p in model.named_parameters() if "log_alpha" not in name]
    log_alpha_before = [g.log_alpha.detach().clone() for g in l0sparse.find_gates(model)]
    l0sparse.training.train.fit(model, data.x_train, data.y_train, epochs=1, lr=1e-12, gate_lr=0.05, lam=1.0, progress=False)
    weights_after = [p.detach() for name, p in model.named_parameters() if "log_alpha" not in name]
    assert all(torch.allclose(a, b, atol=1e-9) for a, b in zip(weights_before, weights_after))
    assert any(not torch.allclose(a, g.log_alpha.detach()) for a, g in zip(log_alpha_before, l0sparse.find_gates(model)))


def test_fit_stops_at_a_non_finite_loss_naming_epoch_and_step():
    from l0sparse.training.data import load_digits_split

    data = load_digits_split()
    x = data.x_train.clone()
    x[70] = float("nan")  # in the second batch of 64 of some permutation: the step is named, whichever it is
    with pytest.raises(l0sparse.training.train.TrainingDiverged, match=r"the loss is nan at epoch 1, step \d+: lower lr"):
        l0sparse.training.train.fit(l0sparse.L0MLP((64, 16, 10)), x, data.y_train, epochs=1, progress=False)


def _epoch(check_every, x, y, seed=0, diverged=None, batches=None):
    """One train_epoch of an L0MLP with the L0 penalty on (x, y) in batches of 16, from ``seed``; returns (totals,
    model, number of reads of the device sums, scalar reads outside them)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from l0sparse.training.regularizers import L0
    from l0sparse.training.train import _StepSums, train_epoch

    torch.manual_seed(seed)
    model = l0sparse.L0MLP((12, 8, 3))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)

    class CountScalarReads(TorchDispatchMode):  # float(t), int(t), bool(t), t.item() all dispatch _local_scalar_dense
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            # Adam reads its step counts, which it keeps on the CPU (on any device): no wait for an accelerator
            steps = {id(state.get("step")) for state in optimizer.state.values()}
            if func is torch.ops.aten._local_scalar_dense.default and id(args[0]) not in steps:
                CountScalarReads.count += 1
            return func(*args, **(kwargs or {}))

    regularizer = L0(model, 0.5, 0.0, N=len(x))
    reads = []
    original = _StepSums.read
    _StepSums.read = lambda self: reads.append(len(self.pending)) or original(self)
    try:
        with CountScalarReads():
            totals = train_epoch(model, optimizer, regularizer, batches or torch.arange(len(x)).split(16),
                                 lambda index: (x[index], y[index]), lambda logits, targets, _: F.cross_entropy(logits, targets),
                                 diverged=diverged, check_every=check_every)
    finally:
        _StepSums.read = original
    return totals, model, reads, CountScalarReads.count


def test_train_epoch_reads_the_device_once_per_interval_with_the_same_figures():
    """The loss and correct count are summed on the device and read every check_every steps and at the end, with no
    other scalar read in the loop; the figures equal the host sums of the previous loop (float(loss)·n in float64,
    int(correct)) exactly, and the training is the same whatever the interval."""
    torch.manual_seed(5)
    x, y = torch.randn(160, 12), torch.randint(0, 3, (160,))
    # the previous loop, by hand: the host reads every step
    torch.manual_seed(0)
    model = l0sparse.L0MLP((12, 8, 3))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    penalty = l0sparse.Penalty(model, 0.5, N=len(x))
    loss_sum, correct = 0.0, 0
    for index in torch.arange(len(x)).split(16):
        logits = model(x[index])
        loss = F.cross_entropy(logits, y[index]) + penalty()
        loss_sum += float(loss.detach()) * len(index)
        correct += int((logits.argmax(-1) == y[index]).sum())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for check_every, expected_reads in ((1, [1] * 10 + [0]), (3, [3, 3, 3, 1]), (1000, [10])):
        totals, trained, reads, scalar_reads = _epoch(check_every, x, y)
        assert reads == expected_reads and scalar_reads == 0
        assert (totals.loss, totals.correct, totals.examples, totals.steps) == (loss_sum, correct, 160, 10)
        for a, b in zip(trained.parameters(), model.parameters()):
            assert torch.equal(a, b)
    with pytest.raises(ValueError, match="check_every"):
        _epoch(0, x, y)


def test_train_epoch_names_the_first_non_finite_step_of_an_interval():
    """A NaN loss at step 4 is named at the read that sees it: step 4 with every interval, raised through
    ``diverged`` or, under DDP (diverged=None), recorded while the epoch goes on."""
    torch.manual_seed(5)
    x, y = torch.randn(160, 12), torch.randint(0, 3, (160,))
    x[50] = float("nan")  # the fourth batch of 16
    for check_every in (1, 3, 1000):
        with pytest.raises(RuntimeError, match=r"step 4: nan"):
            _epoch(check_every, x, y, diverged=lambda step, loss: RuntimeError(f"step {step}: {loss}"))
        totals, _, _, _ = _epoch(check_every, x, y)
        assert totals.first_bad_step == 4 and totals.steps == 10 and math.isnan(totals.loss)
