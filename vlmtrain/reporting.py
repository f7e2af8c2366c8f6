"""Progress of long commands (rendering, writing shards, evaluating): a tqdm bar on a terminal, and plain
lines otherwise (a log file under SLURM or nohup), about every 10 % of the work and at least every 30 s."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

Item = TypeVar("Item")


def duration(seconds: float) -> str:
    """``3725`` → ``1h02m05s``; ``65`` → ``1m05s``."""
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


def progress(items: Iterable[Item], what: str, total: int | None = None, interval: float = 30.0) -> Iterator[Item]:
    """``items``, reporting how many passed (``what``: e.g. "rendering demo images")."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        yield from tqdm(items, desc=what, total=total, unit=" items")
        return
    began = last = time.monotonic()
    step = max(1, (total or 0) // 10)
    done = 0
    for item in items:
        yield item
        done += 1
        now = time.monotonic()
        if (total and done % step == 0) or now - last >= interval:
            last = now
            of = f"/{total}" if total else ""
            print(f"{what}: {done}{of} ({duration(now - began)})", file=sys.stderr, flush=True)
