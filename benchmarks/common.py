"""What the benchmark scripts share."""

import json
from pathlib import Path

from l0sparse.files import atomic_write_text


def save_json(payload, path: Path) -> None:
    """Write a result file atomically (a reader never sees half of one), creating its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json.dumps(payload, indent=1), path)
