"""``make bench``: every benchmark in one run, one report.

    python -m bench.run_all [--benches "store service ..."] [--full] [--out bench/results]
                            [--skip al,soak,soak_writes,soak_writes_log] [--al-workers 2] [--al-steps al,al_new,al_cold]
                            [--script-args "..."]

Runs each ``bench/<name>.py`` of ``--benches`` (the Makefile's ``BENCHES``), then
the soaks (``bench/soak.py``: writes only against its one-commit-per-write reference, the
same with the server's write log on, then the default mix: 1 + 1 + 3 minutes, 3 + 3 + 30
with ``--full``), then the active-learning simulation (``bench.al``), each in
its own process, and writes

* ``<out>/latest.md``: the machine, the command, per benchmark its runtime and its own
  report (tables of assay against a reference measured in the same run, ratio column);
* ``<out>/latest.json``: the same as data (each script's ``--json`` output, the simulation's
  summary and goals); the raw files beside it under ``<out>/latest/``.

Sizes: by default every script runs with ``--quick`` and the simulation with a reduced
plan (digits with both learners and the key strategies, repeated-noisy digits with
random / BALD / BatchBALD; 3 seeds, budget 200, 2 worker processes) and issue 21's
strategies on digits with 10 seeds and the paired test against random, from 2 labels per
class, from none and from 10 random labels (``al_new``, ``al_cold``, ``al_cold10``), which
together fit in about 30 minutes on 2 cores. ``--full`` runs every script at its default size (about 25
minutes) and the simulation's full protocol (4 datasets × both learners × every strategy ×
10 seeds: hours on 2 cores; see README "Does it work?").

``bench/scale.py`` (1M rows with ``--quick``, 10M with ``--full``; an hour and more) is not
in the default list: ``--benches scale --skip soak,soak_writes,soak_writes_log,al --script-args "--data DIR ..."``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BENCHES = ("store", "service", "mining_scan", "uncertainty", "density", "diversity", "selection")
# The reduced simulation plan of `make bench` (see the module docstring).
AL_QUICK_PLAN = ("digits:logreg:random,margin,ratio,badge,cluster_margin,margin_coreset;"
                 "digits:mlp:random,margin,cluster_margin,margin_coreset;"
                 "repeated_digits:mlp:random,bald,batchbald")
# Each script runs as `python bench/<name>.py` would, except that the repository root comes
# before bench/ on sys.path: bench/service.py must not shadow the
# `service` package (common.py still imports from bench/).
# Benchmarks that are one script run with other options than --quick / its defaults:
# name -> (script, quick options, full options). The soak's --quick (30 s) says nothing of a
# service that ages; make bench runs the group-commit soak (writes only, with its same-run
# reference) and a 3-minute default mix, bench-full the 30-minute soak of the goal.
VARIANTS: dict[str, tuple[str, list[str], list[str]]] = {
    "soak_writes": ("soak", ["--mix", "writes", "--minutes", "1", "--window", "20"],
                    ["--mix", "writes", "--minutes", "3", "--window", "30"]),
    # the same against a server that acknowledges small upserts from its write-ahead log
    "soak_writes_log": ("soak", ["--mix", "writes", "--minutes", "1", "--window", "20", "--write-log"],
                        ["--mix", "writes", "--minutes", "3", "--window", "30", "--write-log"]),
    "soak": ("soak", ["--minutes", "3", "--window", "30", "--sample", "15"],
             ["--minutes", "30", "--window", "60", "--sample", "30"]),
}

LAUNCHER = ("import runpy, sys; sys.argv = sys.argv[1:]; "
            "sys.path[:1] = [{root!r}, {bench!r}]; runpy.run_path(sys.argv[0], run_name='__main__')")
AL_QUICK_ARGS = ("--plan", AL_QUICK_PLAN, "--seeds", "3", "--budget", "200")
AL_FULL_ARGS = ("--datasets", "digits,repeated_digits,breast_cancer,wine")
# Issue 21's strategies against random with 10 seeds and the paired test, from 2 labels per
# class and cold, from 0 and from 10 random labels; the same plan in both sizes.
AL_NEW_ARGS = ("--datasets", "digits", "--learners", "logreg", "--strategies", "new", "--seeds", "10",
               "--budget", "100", "--batch", "10", "--no-plots")


def al_cold_args(initial: int) -> tuple[str, ...]:
    """The cold-start plan from ``initial`` random labels."""
    return ("--datasets", "digits", "--learners", "logreg", "--strategies", "random,margin,typiclust,probcover",
            "--initial", str(initial), "--seeds", "10", "--budget", "60", "--batch", "10", "--no-plots")


# name -> (what it is, quick options, full options); `--skip al` skips them all.
AL_STEPS: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "al": ("the simulation", AL_QUICK_ARGS, AL_FULL_ARGS),
    "al_new": ("issue 21's strategies, 10 seeds", AL_NEW_ARGS, AL_NEW_ARGS),
    "al_cold": ("cold start from 0 labels, 10 seeds", al_cold_args(0), al_cold_args(0)),
    "al_cold10": ("cold start from 10 random labels, 10 seeds", al_cold_args(10), al_cold_args(10)),
}


def machine() -> dict[str, Any]:
    import platform

    import numpy as np

    cpu = ""
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), "")
    except OSError:
        pass
    mem_gb = None
    try:
        with open("/proc/meminfo") as fh:
            mem_gb = round(int(next(ln.split()[1] for ln in fh if ln.startswith("MemTotal"))) / 2**20, 1)
    except (OSError, StopIteration, ValueError):
        pass
    return {"cpu_count": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "cpu_model": cpu, "memory_gb": mem_gb, "platform": platform.platform(),
            "python": sys.version.split()[0], "numpy": np.__version__,
            "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def run_logged(cmd: list[str], log: Path) -> tuple[int, float, str]:
    """Run ``cmd`` from the repository root, echoing its output and keeping it in ``log``;
    (exit code, seconds, output)."""
    t0 = time.perf_counter()
    lines: list[str] = []
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=env) as proc, open(log, "w") as fh:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            fh.write(line)
            lines.append(line)
        rc = proc.wait()
    return rc, time.perf_counter() - t0, "".join(lines)


def report_section(output: str) -> str:
    """A script's printed report, from its first markdown heading on, headings demoted two
    levels (they sit under this report's ``## bench/<name>.py``)."""
    lines = output.splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.startswith("# ")), 0)
    out = []
    for ln in lines[start:]:
        out.append("##" + ln if re.match(r"^#{1,4} ", ln) else ln)
    return "\n".join(out).strip()


def _short(path: Path) -> Path:
    """``path`` relative to the repository root when inside it (for the reports)."""
    path = path.resolve()
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run_all", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--benches", default=" ".join(DEFAULT_BENCHES),
                   help="bench/<name>.py scripts to run, space- or comma-separated (the Makefile's BENCHES)")
    p.add_argument("--full", action="store_true",
                   help="default sizes and the simulation's full protocol (hours on 2 cores)")
    p.add_argument("--skip", action="append", default=[],
                   help="comma-separated names to leave out (e.g. al,soak,density); repeatable")
    p.add_argument("--script-args", default="",
                   help="options appended to every script's command, shell-quoted (e.g. with "
                        "--benches scale: \"--n 200000 --miners lof,typicality\")")
    p.add_argument("--al-workers", type=int, default=2, help="worker processes of the simulation")
    p.add_argument("--al-steps", default=",".join(AL_STEPS),
                   help=f"simulation steps to run, comma-separated (of {', '.join(AL_STEPS)})")
    p.add_argument("--al-args", default=None,
                   help="the simulation's options instead of the reduced plan / full protocol (shell-quoted)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    skip = {s.strip() for arg in args.skip for s in arg.split(",") if s.strip()}
    names = [b for b in re.split(r"[\s,]+", args.benches) if b and b not in skip]
    if (ROOT / "bench" / "soak.py").exists():
        names += [n for n in ("soak_writes", "soak_writes_log", "soak") if n not in names and n not in skip]
    raw = args.out / "latest"
    raw.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {"command": "python -m bench.run_all " + shlex.join(argv if argv is not None
                                                                             else sys.argv[1:]),
                           "started": started, "size": "full" if args.full else "quick",
                           "machine": machine(), "benches": []}
    failed = []
    for name in names:
        script_name, quick_args, full_args = VARIANTS.get(name, (name, ["--quick"], []))
        script = ROOT / "bench" / f"{script_name}.py"
        if not script.exists():
            print(f"== bench/{name}.py: not found, skipped", flush=True)
            doc["benches"].append({"name": name, "rc": None, "skipped": "not found"})
            continue
        out_json = _short(raw / f"{name}.json")
        (ROOT / out_json).unlink(missing_ok=True)
        script_args = [f"bench/{script_name}.py", *(full_args if args.full else quick_args),
                       *shlex.split(args.script_args), "--json", str(out_json)]
        cmd = [sys.executable, "-c", LAUNCHER.format(root=str(ROOT), bench=str(ROOT / "bench")), *script_args]
        print(f"\n== {' '.join(script_args[:-2])}", flush=True)
        rc, seconds, output = run_logged(cmd, raw / f"{name}.log")
        entry: dict[str, Any] = {"name": name, "command": " ".join(["python", *script_args]), "rc": rc,
                                 "seconds": round(seconds, 1), "report_md": report_section(output)}
        if (ROOT / out_json).exists():
            try:
                entry["json"] = json.loads((ROOT / out_json).read_text())
            except ValueError:
                entry["json"] = None
        if rc != 0:
            failed.append(name)
        doc["benches"].append(entry)
        write(doc, args.out, t_start)
    for name, (what, quick_plan, full_plan) in AL_STEPS.items():
        if "al" in skip or name in skip or name not in args.al_steps.split(","):
            continue
        al_out = _short(raw / name)  # the report names its plots relative to the repository
        plan = shlex.split(args.al_args) if args.al_args is not None and name == "al" else \
            list(full_plan if args.full else quick_plan)
        al_args = [*plan, "--workers", str(args.al_workers), "--out", str(al_out)]
        cmd = [sys.executable, "-m", "bench.al", *al_args]
        print(f"\n== bench.al: {what}", flush=True)
        rc, seconds, output = run_logged(cmd, raw / f"{name}.log")
        entry = {"name": name, "command": "python -m bench.al " + shlex.join(al_args),
                 "rc": rc, "seconds": round(seconds, 1)}
        al_md, al_json = ROOT / al_out / "al.md", ROOT / al_out / "al.json"
        if al_md.exists():
            entry["report_md"] = report_section(al_md.read_text())
        if al_json.exists():
            al_doc = json.loads(al_json.read_text())
            entry["json"] = {k: al_doc.get(k) for k in ("summary", "goals", "config", "runtime_s", "plots")}
        if rc != 0:
            failed.append(name)
        doc["benches"].append(entry)
        write(doc, args.out, t_start)
    doc["machine"]["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    write(doc, args.out, t_start)
    print(f"\nwrote {args.out / 'latest.md'} and {args.out / 'latest.json'} "
          f"({doc['total_s'] / 60:.1f} min{'; FAILED: ' + ', '.join(failed) if failed else ''})")
    return 1 if failed else 0


def write(doc: dict[str, Any], out: Path, t_start: float) -> None:
    """Both reports, rewritten after every benchmark (a failed run leaves what was done)."""
    doc["total_s"] = round(time.perf_counter() - t_start, 1)
    (out / "latest.json").write_text(json.dumps(doc, indent=1, default=str))
    (out / "latest.md").write_text(render(doc))


def render(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    load = m.get("loadavg_start")
    lines = [
        "# assay benchmarks",
        "",
        f"- command: `make bench` → `{doc['command'].strip()}` ({doc['size']} sizes), started {doc['started']}, "
        f"total {doc.get('total_s', 0) / 60:.1f} min",
        f"- machine: {m['cpu_count']} CPUs ({m['cpus_usable']} usable), {m['cpu_model']}, {m['memory_gb']} GB RAM, "
        f"{m['platform']}; python {m['python']}, numpy {m['numpy']}"
        + (f"; load average at start {load[0]:.2f}" if load else "")
        + (f", at end {m['loadavg_end'][0]:.2f}" if m.get("loadavg_end") else ""),
        "- every figure is assay against a reference measured in the same run on the same machine "
        "(ratio column); the machine is shared and noisy: read the ratios, not the absolute times",
        "",
        "| benchmark | command | seconds | status |",
        "|---|---|---:|---|",
    ]
    for b in doc["benches"]:
        status = "skipped" if b.get("skipped") else ("ok" if b.get("rc") == 0 else f"FAILED (exit {b.get('rc')})")
        lines.append(f"| {b['name']} | `{b.get('command', '')}` | {b.get('seconds', 0):.0f} | {status} |")
    for b in doc["benches"]:
        if b.get("skipped"):
            continue
        lines += ["", f"## {b['name']}", "", f"`{b.get('command', '')}` — {b.get('seconds', 0):.0f} s", "",
                  b.get("report_md") or "(no report)"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
