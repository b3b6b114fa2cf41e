"""Progress on long work: a tqdm bar on a terminal, plain periodic log lines anywhere else.

A Kubeflow pod's log (or any redirected output) is not a terminal: tqdm's carriage-return redraws there
become thousands of lines. :func:`progress` then logs one line every ``BLENDSIGN_PROGRESS_SECONDS``
(default 30) seconds and one at the end, through the module's logger at INFO.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Iterable, Iterator, Sized
from typing import Any, Generic, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")
INTERVAL_ENV = "BLENDSIGN_PROGRESS_SECONDS"


class LogProgress(Generic[T]):
    """The subset of tqdm's interface blendsign uses (iterate, ``update``, ``set_postfix``, ``close``),
    reporting as log lines: ``desc: 40/120 batch (33%), 2.1 batch/s, ~38 s left, loss=0.41``."""

    def __init__(self, iterable: Iterable[T] | None, *, total: int | None, desc: str, unit: str,
                 interval: float) -> None:
        self.iterable, self.desc, self.unit, self.interval = iterable, desc, unit, interval
        if total is None and iterable is not None and isinstance(iterable, Sized):
            total = len(iterable)
        self.total, self.n, self.postfix = total, 0, ""
        self.start = self.last = time.monotonic()
        self.closed = False

    def __iter__(self) -> Iterator[T]:
        assert self.iterable is not None, "LogProgress without an iterable: call update()"
        try:
            for item in self.iterable:
                yield item
                self.update()
        finally:
            self.close()

    def __enter__(self) -> LogProgress[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            log.info("%s", self.line(now))

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def line(self, now: float) -> str:
        elapsed = max(now - self.start, 1e-9)
        rate = self.n / elapsed
        parts = [f"{self.n}/{self.total} {self.unit}" if self.total else f"{self.n} {self.unit}"]
        if self.total:
            parts[0] += f" ({100 * self.n / self.total:.0f}%)"
        parts.append(f"{rate:.3g} {self.unit}/s")
        if self.total and rate > 0 and self.n < self.total:
            parts.append(f"~{math.ceil((self.total - self.n) / rate)} s left")
        elif self.n and self.total and self.n >= self.total:
            parts.append(f"{elapsed:.0f} s")
        if self.postfix:
            parts.append(self.postfix)
        return f"{self.desc}: " + ", ".join(parts)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.n:
                log.info("%s", self.line(time.monotonic()))


class _Silent(LogProgress[T]):
    """No output at all (``enabled=False``)."""

    def update(self, n: int = 1) -> None:
        self.n += n

    def close(self) -> None:
        self.closed = True


def progress(iterable: Iterable[T] | None = None, *, total: int | None = None, desc: str, unit: str = "it",
             enabled: bool = True, leave: bool = True) -> Any:
    """A progress reporter over ``iterable`` (or driven by ``update`` when ``iterable`` is None).

    ``enabled`` and stderr a terminal: a tqdm bar. ``enabled`` otherwise: :class:`LogProgress` lines every
    ``$BLENDSIGN_PROGRESS_SECONDS`` s. Not ``enabled``: silent.
    """
    if not enabled:
        return _Silent(iterable, total=total, desc=desc, unit=unit, interval=math.inf)
    if sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=leave)
    interval = float(os.environ.get(INTERVAL_ENV) or 30)
    return LogProgress(iterable, total=total, desc=desc, unit=unit, interval=interval)
