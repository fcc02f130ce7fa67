"""Writing result files so that a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import torch


def atomic_write(write: Callable[[Path], Any], path: str | os.PathLike) -> None:
    """Write through ``write(temporary)`` in the same folder, then rename over ``path``.

    An interrupt or error part-way (a SIGTERM that lands mid-save, a full disk) removes the temporary
    file and leaves any earlier ``path`` untouched.
    """
    path = Path(path)
    temporary = path.with_name(path.name + ".tmp")
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def atomic_save(payload: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through :func:`atomic_write`."""
    atomic_write(lambda temporary: torch.save(payload, temporary), path)


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    """``Path.write_text`` through :func:`atomic_write`."""
    atomic_write(lambda temporary: temporary.write_text(text), path)
