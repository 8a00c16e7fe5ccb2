"""indexing.settings: the one home of every environment variable and tunable constant."""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from indexing import settings
from indexing.settings import SETTINGS, markdown_table
from indexing.store import storage_options_from_env
from service.server import ServerConfig
from service.servicers import Limits

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("service", "indexing", "miners")


def _sources() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def test_every_setting_is_in_the_readme_table():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    start = readme.index(settings.BEGIN) + len(settings.BEGIN)
    table = readme[start:readme.index(settings.END)]
    assert table == markdown_table(), "run `make settings`"
    for s in SETTINGS.values():
        assert (f"`{s.env}`" if s.env else f"`{s.name}`") in table, s.name
    check = subprocess.run([sys.executable, "-m", "indexing.settings", "--check", "README.md"],
                           cwd=ROOT, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


def test_no_other_module_reads_the_environment():
    """os.environ / os.getenv appear in indexing/settings.py only (setting a library's own
    variable, os.environ.setdefault, is not reading one of ours)."""
    readers = []
    for path in _sources():
        if path == ROOT / "indexing" / "settings.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        writes = {id(n.func.value) for n in ast.walk(tree) if isinstance(n, ast.Call)
                  and isinstance(n.func, ast.Attribute) and n.func.attr == "setdefault"}
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv", "environb") \
                    and ast.unparse(node.value) == "os" and id(node) not in writes:
                readers.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert readers == []


def test_every_constant_is_used_where_it_acts():
    """Each constant of the module is imported by some module of the package: none is dead,
    none is defined twice (a module with its own copy would not import it)."""
    imported: set[str] = set()
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module == "indexing.settings":
                imported |= {a.name for a in node.names}
            if isinstance(node, ast.Attribute) and ast.unparse(node.value) == "settings":
                imported.add(node.attr)
    constants = {s.name for s in SETTINGS.values() if s.name.isupper() and s.env is None}
    assert constants - imported == set()


def test_server_config_and_limits_take_their_defaults_from_the_module():
    config, limits = ServerConfig(), Limits()
    server = {s.name for s in SETTINGS.values() if s.group == "server"}
    assert {f.name for f in fields(ServerConfig)} - {"limits"} == server
    assert {f.name for f in fields(Limits)} == {s.name for s in SETTINGS.values() if s.group == "limits"}
    for name in server:
        assert getattr(config, name) == SETTINGS[name].default, name
    for f in fields(Limits):
        assert getattr(limits, f.name) == SETTINGS[f.name].default


def test_from_env_parses_each_kind(monkeypatch):
    monkeypatch.setenv("ASSAY_PORT", "6000")
    monkeypatch.setenv("ASSAY_GRACE_S", "2.5")
    monkeypatch.setenv("ASSAY_ALLOW_UNAUTHENTICATED_REMOTE", "yes")
    monkeypatch.setenv("ASSAY_TOKEN", " a, b ,,")
    monkeypatch.setenv("ASSAY_DATA_ROOTS", "/x,s3://b/p")
    monkeypatch.setenv("ASSAY_METRICS_PORT", "9100")
    monkeypatch.setenv("ASSAY_MAX_K", "77")
    monkeypatch.setenv("ASSAY_HOST", "")  # empty: unset
    cfg = ServerConfig.from_env(port=7000, grace_s=None)
    assert cfg.port == 7000  # an override wins
    assert cfg.grace_s == 2.5 and cfg.allow_unauthenticated_remote is True
    assert cfg.tokens == ("a", "b") and cfg.data_roots == ("/x", "s3://b/p")
    assert cfg.metrics_port == 9100 and cfg.host == "127.0.0.1"
    assert cfg.limits.max_k == 77 and cfg.limits.max_batch_rows == SETTINGS["max_batch_rows"].default
    monkeypatch.setenv("ASSAY_ALLOW_UNAUTHENTICATED_REMOTE", "0")
    assert ServerConfig.from_env().allow_unauthenticated_remote is False


def test_variables_are_read_when_needed_not_at_import(monkeypatch):
    assert storage_options_from_env("./local") == {}
    monkeypatch.setenv("ASSAY_S3_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("ASSAY_S3_TIMEOUT", "2s")
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-3")
    opts = storage_options_from_env("s3://bucket/prefix")
    assert opts["endpoint"] == "http://127.0.0.1:9" and opts["allow_http"] == "true"
    assert opts["timeout"] == "2s" and opts["region"] == "eu-west-3"
    assert opts["connect_timeout"] == SETTINGS["ASSAY_S3_CONNECT_TIMEOUT"].default


def test_settings_refuse_a_second_definition():
    with pytest.raises(ValueError, match="defined twice"):
        settings._define("MAX_K", 1, "again", "store")
