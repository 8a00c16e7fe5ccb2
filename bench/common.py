"""What every benchmark prints: the machine, and a table of figures against a reference
measured in the same run (``| measure | assay | reference | ratio |``)."""

from __future__ import annotations

import atexit
import json
import os
import platform
import signal
import sys
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

# ratio = assay / reference for these kinds (higher is better) ...
HIGHER_IS_BETTER = ("speed", "recall")
# ... and reference / assay for these (lower is better); "info" rows have no ratio.
LOWER_IS_BETTER = ("latency", "cost")


@dataclass
class Row:
    """One line of the final table."""

    measure: str
    assay: float | None
    reference: float | None
    ratio: float | None
    unit: str = ""
    note: str = ""


@dataclass
class Report:
    machine: dict[str, Any]
    params: dict[str, Any]
    rows: list[Row] = field(default_factory=list)
    keyed: dict[tuple[Any, ...], Row] = field(default_factory=dict)
    targets: list[dict[str, Any]] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def write_json(self, path: str) -> None:
        """The machine, the parameters and the rows, as JSON at ``path``."""
        with open(path, "w") as fh:
            json.dump({"machine": self.machine, "params": self.params,
                       "rows": [asdict(r) for r in self.rows]}, fh, indent=1)

    def add(self, measure: str, assay: float | None, reference: float | None, *, kind: str,
            unit: str = "", note: str = "", key: tuple[Any, ...] | None = None) -> Row:
        """kind: 'speed'/'recall' (ratio assay/ref), 'latency'/'cost' (ref/assay), 'info'."""
        ratio: float | None = None
        if assay is not None and reference is not None and kind != "info":
            if kind in LOWER_IS_BETTER:
                ratio = reference / assay if assay else None
            else:
                ratio = assay / reference if reference else None
        row = Row(measure, assay, reference, ratio, unit, note)
        self.rows.append(row)
        if key is not None:
            self.keyed[key] = row
        return row


def machine(**versions: str) -> dict[str, Any]:
    """CPU, platform, Python and NumPy, plus the library ``versions`` given."""
    cpu_model = ""
    try:
        with open("/proc/cpuinfo") as fh:
            cpu_model = next((ln.split(":", 1)[1].strip() for ln in fh
                              if ln.startswith("model name")), "")
    except OSError:
        pass
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": affinity,
        "cpu_model": cpu_model,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        **versions,
        "numpy": np.__version__,
    }


def fmt(v: float | None, unit: str = "") -> str:
    if v is None:
        return "–"
    if unit in ("rows/s", "q/s", "count"):
        return f"{v:,.0f}"
    if unit == "ms":
        return f"{v:.2f}"
    if unit == "sci":
        return f"{v:.1e}"
    if unit in ("s", "%", "MB"):
        return f"{v:.1f}" if v < 1000 else f"{v:,.0f}"
    return f"{v:.3f}"


def render(report: Report) -> str:
    lines = ["| measure | assay | reference | ratio |", "|---|---:|---:|---:|"]
    for r in report.rows:
        ratio = "–" if r.ratio is None else f"{r.ratio:.2f}"
        lines.append(f"| {r.measure} | {fmt(r.assay, r.unit)} | {fmt(r.reference, r.unit)} "
                     f"| {ratio} |")
    return "\n".join(lines)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(wall seconds, result) of ``fn()``."""
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def ms(seconds: float) -> float:
    return seconds * 1e3


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_RUNNING: weakref.WeakSet[ServerProcess] = weakref.WeakSet()  # started, not stopped


def _stop_running_servers() -> None:
    for server in list(_RUNNING):
        server.stop(timeout=10)


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


class ServerProcess:
    """``assay serve`` as its own process on a data root (so its memory is its own and it
    can be killed): start (waits for health SERVING), kill -9, stop, RSS.

    A benchmark stopped with SIGTERM (``timeout``, a CI runner, ``kill``) stops its servers
    too: the first start makes SIGTERM exit the benchmark through its ``finally`` blocks
    and stops, at exit, every server still running (left to Python's default, SIGTERM ended
    the benchmark and left its ``assay serve`` running)."""

    def __init__(self, data: str, log_dir: str, *, extra_args: tuple[str, ...] = (),
                 env: dict[str, str] | None = None, grace_s: float = 2) -> None:
        self.data, self.log_dir, self.extra_args = data, log_dir, extra_args
        self.env = env or {}
        self.grace_s = grace_s
        self.proc: Any = None
        self.address = ""
        self.starts = 0

    def start(self, timeout: float = 180) -> str:
        import subprocess

        from service.client import AssayClientError, Client

        port = free_port()
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **self.env}
        os.makedirs(self.log_dir, exist_ok=True)
        if threading.current_thread() is threading.main_thread() \
                and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _exit_on_sigterm)
            atexit.register(_stop_running_servers)
        _RUNNING.add(self)
        self.starts += 1
        with open(self.log_path(), "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "service.cli", "serve", "--data", self.data, "--port", str(port),
                 "--log-format", "text", "--grace", f"{self.grace_s:g}", *self.extra_args],
                cwd=root, env=env, stdout=log, stderr=log)
        self.address = f"127.0.0.1:{port}"
        deadline = time.monotonic() + timeout
        with Client(self.address, retries=0, timeout=2) as probe:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError("the server exited:\n" + self.log_tail())
                try:
                    if probe.health() == "SERVING":
                        return self.address
                except AssayClientError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("the server did not start:\n" + self.log_tail())
                time.sleep(0.05)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_path(self) -> str:
        """The log of the latest start."""
        return os.path.join(self.log_dir, f"server-{max(1, self.starts)}.log")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self, timeout: float = 60) -> None:
        import subprocess

        _RUNNING.discard(self)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def rss_bytes(self) -> tuple[int, int]:
        """(current, peak) resident set size of the server process."""
        cur = peak = 0
        try:
            with open(f"/proc/{self.proc.pid}/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        cur = int(line.split()[1]) * 1024
                    elif line.startswith("VmHWM:"):
                        peak = int(line.split()[1]) * 1024
        except (OSError, AttributeError):
            pass
        return cur, peak

    def cpu_seconds(self) -> float:
        """CPU time (user + system, every thread) the server process has used so far; 0.0
        when it is not running."""
        try:
            with open(f"/proc/{self.proc.pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except (OSError, AttributeError):
            return 0.0
        # after the command name: state is field 3, utime 14 and stime 15 (proc(5))
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def log_tail(self, lines: int = 40) -> str:
        try:
            with open(self.log_path(), errors="replace") as fh:
                return "".join(fh.readlines()[-lines:])
        except OSError:
            return ""
