"""Progress display of long calls (upserts, job waits).

On a terminal: a tqdm bar when tqdm is installed, else one line rewritten in place. Anywhere
else (a pipe, a log file, CI): plain lines, one when the status changes or another tenth of
the work is done and at most one every ``PLAIN_EVERY_S`` seconds otherwise, and the last
one always — never carriage returns or bar characters in a log.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

__all__ = ["Progress"]

PLAIN_EVERY_S = 5.0  # seconds between plain lines when nothing else calls for one


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed, or not a real file
        return False


class Progress:
    """Progress of ``total`` ``unit`` (None: unknown) on ``stream`` (default stderr)."""

    def __init__(self, enabled: bool, *, total: float | None, desc: str, unit: str,
                 stream: TextIO | None = None) -> None:
        self.enabled, self.total, self.desc, self.unit = enabled, total, desc, unit
        self.stream = stream if stream is not None else sys.stderr
        self.tty = _isatty(self.stream)
        self._bar: Any = None
        self._last = 0.0
        self._last_line = ""
        self._last_step = -1
        self._last_status = ""
        if enabled and self.tty:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                return
            # A percentage has no meaningful rate ("9506.58%/s"): leave the rate out of it.
            fmt = ("{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}{postfix}]"
                   if unit == "%" else None)
            self._bar = tqdm(total=total, desc=desc, unit=unit, leave=True, file=self.stream,
                             bar_format=fmt)

    def _text(self, done: float, status: str) -> str:
        if self.unit == "%":
            amount = f"{done:.0f}%"
        else:
            amount = f"{done:g}{f'/{self.total:g}' if self.total else ''} {self.unit}"
        return f"{self.desc}: {amount}{f' {status}' if status else ''}"

    def update(self, done: float, status: str = "") -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.n = done
            self._bar.set_postfix_str(status, refresh=False)
            self._bar.refresh()
            return
        now = time.monotonic()
        finished = self.total is not None and done >= self.total
        if self.tty:
            if now - self._last >= 0.5 or finished:
                self._last = now
                self.stream.write("\r" + self._text(done, status).ljust(60))
                self.stream.flush()
            return
        step = int(10 * done / self.total) if self.total else -1
        line = self._text(done, status)
        due = (status and status != self._last_status) or step > self._last_step or finished \
            or now - self._last >= PLAIN_EVERY_S
        if due and line != self._last_line:
            self._last, self._last_line, self._last_step, self._last_status = now, line, step, status
            self.stream.write(line + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.enabled and self.tty:
            self.stream.write("\n")
        self.enabled = False
