"""Atomic result files: an interrupted write leaves the old file and no temporary behind."""

import pytest
import torch

from l0sparse.training.files import atomic_save, atomic_write, atomic_write_text


def test_interrupt_mid_write_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    path = tmp_path / "checkpoint.pt"
    atomic_save({"epoch": 1}, path)

    def interrupted(temporary):
        temporary.write_bytes(b"half a checkpoint")
        raise KeyboardInterrupt("SIGTERM")  # what the training harness turns SIGTERM into

    with pytest.raises(KeyboardInterrupt):
        atomic_write(interrupted, path)
    assert torch.load(path, weights_only=True) == {"epoch": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_error_before_any_byte_is_written_leaves_nothing(tmp_path):
    path = tmp_path / "result.json"

    def failing(temporary):
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(failing, path)
    assert list(tmp_path.iterdir()) == []


def test_successful_write_replaces_the_file(tmp_path):
    path = tmp_path / "config.json"
    atomic_write_text("old", path)
    atomic_write_text("new", path)
    assert path.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]
