"""What the benchmark scripts share."""

import json
from pathlib import Path


def save_json(payload, path: Path) -> None:
    """Write JSON through a temporary file and a rename: a reader never sees half a result file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(payload, indent=1))
    temporary.replace(path)
