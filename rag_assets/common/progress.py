"""Progress for long loops: a bar on a terminal, counts and rate in a log (the Dagster log)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

from tqdm import tqdm


class Progress:
    """Count work done; report to `log` at most every `every_s` seconds and once at the end."""

    def __init__(
        self,
        label: str,
        total: int,
        log: Callable[[str], None] | None = None,
        every_s: float = 5.0,
    ) -> None:
        self.label = label
        self.total = total
        self.done = 0
        self._log = log
        self._every_s = every_s
        self._started = time.perf_counter()
        self._last_report = self._started
        self._bar = tqdm(total=total, desc=label, unit="item", disable=not sys.stderr.isatty())

    def update(self, n: int = 1) -> None:
        self.done += n
        self._bar.update(n)
        now = time.perf_counter()
        if self._log and now - self._last_report >= self._every_s:
            self._last_report = now
            self._log(self._line(now))

    def close(self) -> float:
        """Finish and return the elapsed seconds."""
        self._bar.close()
        now = time.perf_counter()
        if self._log:
            self._log(self._line(now))
        return now - self._started

    def _line(self, now: float) -> str:
        elapsed = max(now - self._started, 1e-9)
        return (
            f"{self.label}: {self.done}/{self.total} ({self.done / elapsed:,.0f}/s, {elapsed:.1f}s elapsed)"
        )
