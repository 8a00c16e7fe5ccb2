"""Progress display of long calls (upserts, job waits)."""

from __future__ import annotations

import sys
import time
from typing import Any

__all__ = ["Progress"]


class Progress:
    """A tqdm bar when ``enabled`` and tqdm is installed, else a throttled stderr line."""

    def __init__(self, enabled: bool, *, total: float | None, desc: str, unit: str) -> None:
        self.enabled, self.total, self.desc, self.unit = enabled, total, desc, unit
        self._bar: Any = None
        self._last = 0.0
        if enabled:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                return
            self._bar = tqdm(total=total, desc=desc, unit=unit, leave=True)

    def update(self, done: float, status: str = "") -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.n = done
            self._bar.set_postfix_str(status, refresh=False)
            self._bar.refresh()
        elif time.monotonic() - self._last >= 0.5 or done == self.total:
            self._last = time.monotonic()
            of = f"/{self.total:g}" if self.total else ""
            sys.stderr.write(f"\r{self.desc}: {done:g}{of} {self.unit} {status}".ljust(60))
            sys.stderr.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.enabled:
            sys.stderr.write("\n")
        self.enabled = False
