"""What every bench script writes: ``bench/results/<name>[_<tag>].json`` (the command and the rows) and
the markdown table beside it."""
from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from tdmr_ray.utils import write_atomic  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def command_line(script: str, argv=None) -> str:
    """The command as a user types it (``python bench/<script> ...``)."""
    return shlex.join(["python", f"bench/{script}", *(sys.argv[1:] if argv is None else argv)])


def write_rows(name: str, tag: str, command: str, rows: list[dict], markdown: list[str]) -> Path:
    """Write the JSON and markdown of one run; returns the path without suffix."""
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / (name + (f"_{tag.lstrip('_')}" if tag else ""))
    write_atomic(stem.with_suffix(".json"), json.dumps({"command": command, "rows": rows}, indent=1).encode())
    write_atomic(stem.with_suffix(".md"), ("\n".join(markdown) + "\n").encode())
    return stem
