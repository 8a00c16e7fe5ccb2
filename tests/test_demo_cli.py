"""The demo (what `make demo` runs) and the CLI, on real sample data and the packaged MiniLM."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from service.cli import main
from service.demo import run_demo


def demo_cli_page(data: Path) -> tuple[dict, dict]:
    """Run `assay demo` as a process, read the page address it prints, fetch the mined
    run's grid and one thumbnail from it, stop it with Ctrl-C (SIGINT)."""
    env = {**os.environ, "ASSAY_LOG_LEVEL": "WARNING"}
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "demo", "--data", str(data), "--http-port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        deadline = time.monotonic() + 240
        address = None
        for line in proc.stdout:
            m = re.search(r"the mined digits: (http://127\.0\.0\.1:\d+/)#/runs/([0-9a-f]+)", line)
            if m:
                address, run_id = m.groups()
                break
            assert time.monotonic() < deadline, "the demo did not print its page"
        assert address, "the demo ended without printing its page"
        with urllib.request.urlopen(address) as res:
            assert b"/static/app.js" in res.read()
        with urllib.request.urlopen(f"{address}api/runs/{run_id}") as res:
            run = json.loads(res.read())
        first = run["items"][0]["id"]
        with urllib.request.urlopen(f"{address}api/thumb?c=digits&id={first}") as res:
            page = {"thumb_type": res.headers["Content-Type"], "thumb": res.read()}
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        return page, run
    finally:
        if proc.poll() is None:
            proc.kill()


def test_demo_loads_and_finds_real_neighbours(tmp_path, capsys):
    lines: list[str] = []
    summary = run_demo(str(tmp_path / "data"), out=lines.append)
    assert summary["digits"] == 1797 and summary["texts"] == 80
    # Pixel-space neighbours of a '3' are mostly 3s; MiniLM finds the right topics.
    assert summary["digit_neighbours_agree"] >= 0.7
    assert [topics[0] for topics in summary["text_topics"]] == ["cooking", "astronomy", "programming"]
    assert any("Nearest unlabeled digits" in line for line in lines)
    # The margin miner's picks are uncertain for a reason: the model gets many of them wrong
    # (on the whole pool it is right on ~95%).
    assert len(summary["mined"]) == 10 and summary["mined_wrong"] >= 3
    # `make demo` runs it again the way a person does: upserts the same ids (no duplicates),
    # prints the web page's address, serves the mined digits until Ctrl-C.
    page, run = demo_cli_page(tmp_path / "data")
    assert len(run["items"]) == 10 and run["run"]["miner"] == "margin"
    assert [it["rank"] for it in run["items"]] == list(range(1, 11))
    assert all(0 <= it["score"] <= 1 and it["uri"].endswith(".png") and it["prediction"]["model"] == "logreg"
               for it in run["items"])
    assert page["thumb_type"] == "image/png"
    from indexing.store import Store

    store = Store(str(tmp_path / "data"))
    assert store.collection("digits").count() == 1797 and store.collection("texts").count() == 80

    root = str(tmp_path / "data")
    assert main(["collections", "--data", root]) == 0
    out = capsys.readouterr().out
    assert "digits\t1797 rows" in out and "texts\t80 rows" in out
    assert main(["describe", "digits", "--data", root]) == 0
    desc = json.loads(capsys.readouterr().out)
    assert desc["spaces"]["pixels"]["dim"] == 64 and desc["models"]["logreg"]["classes"][0] == "0"
    assert main(["recall", "digits", "--space", "pixels", "--data", root, "--queries", "10"]) == 0
    assert json.loads(capsys.readouterr().out)["recall"] == 1.0  # flat search is exact
    assert main(["describe", "nope", "--data", root]) == 2
    assert "NOT_FOUND" in capsys.readouterr().err
    assert main(["drop", "texts", "--data", root]) == 0
    assert capsys.readouterr().out == "dropped texts\n"
    assert main(["collections", "--data", root]) == 0
    assert capsys.readouterr().out.splitlines() == ["digits\t1797 rows\tversion " + str(desc["version"])]
