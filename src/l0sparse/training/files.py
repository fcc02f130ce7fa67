"""Result files: written so that a reader sees the old file or the new one, never half of one; read with errors that name them."""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
    """``torch.save`` through :func:`atomic_write`; a failed write (a full disk) is an OSError naming ``path``."""
    try:
        atomic_write(lambda temporary: torch.save(payload, temporary), path)
    except RuntimeError as error:  # torch reports ENOSPC as "PytorchStreamWriter failed writing file ..."
        if "writ" not in str(error):
            raise
        raise OSError(errno.EIO, f"could not write it ({' '.join(str(error).split())[:120]}); is the disk full? "
                                 "the previous file is untouched", str(path)) from None


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    """``Path.write_text`` through :func:`atomic_write`."""
    atomic_write(lambda temporary: temporary.write_text(text), path)


def regular_file(path: str | os.PathLike) -> Path:
    """``path``, refused when it exists but is neither a regular file nor a folder: reading a FIFO with no writer blocks
    forever, a device may never end (issue #27)."""
    path = Path(path)
    if path.exists() and not path.is_file() and not path.is_dir():
        raise ValueError(f"{path} is not a regular file (a FIFO, socket or device, which reading could block on forever): "
                         "give the path of a file")
    return path


def read_json(path: str | os.PathLike) -> Any:
    """The JSON value in ``path``; a file that is not JSON gives a ValueError that names it."""
    path = regular_file(path)
    try:
        return json.loads(path.read_text(errors="replace"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}): it is damaged; restore it or start the run again") from None


def torch_load(path: str | os.PathLike) -> Any:
    """``torch.load(path, weights_only=True)`` with one clear error for an empty, truncated or foreign file."""
    path = regular_file(path)
    try:
        return torch.load(path, weights_only=True)
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise  # missing or unreadable: the error already names the path (torch itself raises OSError for some damage)
    except Exception as error:  # torch raises RuntimeError, EOFError, UnpicklingError, ... for a damaged file
        text = str(error).strip()
        reason = text.splitlines()[0].split(". ")[0] if text else type(error).__name__  # torch's first sentence says what failed
        if "weights only" in reason.lower():  # torch's text then suggests weights_only=False: never for an untrusted file
            reason = "it holds objects other than tensors, which are not loaded for safety"
        raise ValueError(f"{path} cannot be loaded ({reason}): it is empty, truncated or not written by l0sparse; "
                         "delete it and train again, or restore it from a copy") from None
