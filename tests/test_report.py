"""l0sparse.core.report: summary() and architecture(), what each gate keeps."""

import l0sparse

from models import build


def test_summary_and_architecture():
    model, x = build("resnet")
    table = l0sparse.summary(model, x)
    text = str(table)
    assert "block.conv1" in text and "total" in text
    pruned = l0sparse.prune(model, x)
    totals = {k: sum(r[k] for r in table.rows) for k in ("flops_kept", "params_kept")}
    assert totals["flops_kept"] == l0sparse.count_flops(pruned, x)
    arch = l0sparse.architecture(model)
    before, after = arch.split(" -> ")
    assert len(before.split("-")) == len(after.split("-"))
    assert all(int(a) <= int(b) for a, b in zip(after.split("-"), before.split("-")))
    assert table.to_markdown().startswith("| layer |")
