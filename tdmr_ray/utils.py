"""Small shared helpers: cache locations, a progress line, atomic local writes."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


def cache_dir() -> Path:
    """Where extracted archives and decoded arrays go: ``$TDMR_CACHE`` or ``~/.cache/tdmr_ray``."""
    path = Path(os.environ.get("TDMR_CACHE", Path.home() / ".cache" / "tdmr_ray"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def progress(items: Iterable[T], total: int, desc: str, every_s: float = 2.0) -> Iterator[T]:
    """Yield ``items`` and print ``desc: done/total`` to stderr at most every ``every_s`` seconds."""
    start = last = time.monotonic()
    for i, item in enumerate(items, 1):
        yield item
        now = time.monotonic()
        if now - last >= every_s or i == total:
            last = now
            rate = i / max(now - start, 1e-9)
            print(f"{desc}: {i}/{total} ({rate:.0f}/s)", file=sys.stderr, flush=True)


def write_atomic(path: Path, data: bytes) -> None:
    """Write through a temporary file and rename, so readers never see a partial file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
