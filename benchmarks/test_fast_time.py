"""How long `make test-fast`'s pytest part takes here: `pytest -q -m "not slow"` timed once, with the machine's load.

    .venv/bin/python benchmarks/test_fast_time.py     # writes benchmarks/results/test_fast_time.json
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "not slow", "-p", "no:cacheprovider"], cwd=ROOT,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    summary = done.stdout.strip().splitlines()[-1]
    passed = int(re.search(r"(\d+) passed", summary).group(1))
    record = {"command": "pytest -q -m 'not slow'", "exit_code": done.returncode, "wall_seconds": round(seconds, 1), "passed": passed,
              "summary": summary, "load_average_before": load_before, "cpus": os.cpu_count()}
    out = ROOT / "benchmarks" / "results" / "test_fast_time.json"
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
