"""Connections that hold for hours: the server's keepalive policy admits the client's pings.

The intervals are shortened (the client pings after 1 s of silence instead of 60 s) so that
a wait of a few seconds spans several pings. The same waits against a server that keeps
gRPC's default policy (client pings at most every 5 minutes) are cut with GOAWAY
"too_many_pings", which is what happened to a 4-minute quiet ``score_stream`` and to
``job.wait()`` on long jobs before the policy was set.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from service.client import Client, UnavailableError
from service.jobs import JobKind
from service.server import ServerConfig, start_server

QUIET_S = 5.0  # how long each call waits without a byte on the wire: 5 client pings


def _server(tmp_path, **settings):
    srv = start_server(ServerConfig(data=str(tmp_path / "data"), port=0, grace_s=1, **settings))

    def quiet(ctx, col, params):
        """A job that reports nothing while it runs: its WatchJob stream is silent."""
        end = time.monotonic() + float(params["seconds"])
        while time.monotonic() < end:
            ctx.check()
            time.sleep(0.05)
        return {"slept": params["seconds"]}

    srv.jobs.register("quiet_test_job", JobKind(run=quiet))
    return srv


def _paused(pause: float) -> Iterator[dict[str, np.ndarray]]:
    """A live feed with a quiet spell: one item, nothing for ``pause`` s, one more."""
    yield {"probs": np.array([[0.3, 0.7]])}
    time.sleep(pause)
    yield {"probs": np.array([[0.45, 0.55]])}


def _quiet_calls(client: Client) -> tuple[object, object]:
    """A job.wait() on a quiet job and a paused score_stream, at the same time; each
    result is the value or the exception raised."""
    col = client.create_collection("feed", models={"m": ["a", "b"]})

    def wait_job():
        return client.start_job("quiet_test_job", "feed", {"seconds": QUIET_S}).wait(timeout=60)

    def stream():
        return list(col.score_stream(_paused(QUIET_S), model="m"))

    def outcome(fn):
        try:
            return fn()
        except Exception as exc:  # the test looks at what came back
            return exc

    with ThreadPoolExecutor(2) as pool:
        job, scores = pool.map(outcome, [wait_job, stream])
    return job, scores


def test_long_quiet_calls_keep_their_connection(tmp_path):
    # The client pings every second while the calls wait; the server allows one every 0.5 s.
    srv = _server(tmp_path, min_ping_interval_s=0.5)
    try:
        with Client(srv.address, keepalive_s=1.0, keepalive_timeout_s=5.0, retries=0) as client:
            job, scores = _quiet_calls(client)
            assert not isinstance(job, Exception), job
            assert job.state == "SUCCEEDED" and job.result == {"slept": QUIET_S}
            assert not isinstance(scores, Exception), scores
            assert [t.num_rows for t in scores] == [1, 1]
            assert scores[1].column("margin").to_pylist() == pytest.approx([1 - (0.55 - 0.45)])
            assert client.list_collections() == ["feed"]  # the connection still serves
    finally:
        srv.stop(0)


def test_pings_faster_than_the_server_allows_cut_the_calls(tmp_path):
    # gRPC's default server policy (5 minutes): the third early ping gets GOAWAY.
    srv = _server(tmp_path, min_ping_interval_s=300.0)
    try:
        with Client(srv.address, keepalive_s=1.0, keepalive_timeout_s=5.0, retries=0) as client:
            job, scores = _quiet_calls(client)
            for result in (job, scores):
                assert isinstance(result, UnavailableError), result
                assert "ping" in result.message.lower()
    finally:
        srv.stop(0)


def test_max_connection_age_does_not_cut_a_stream_in_flight(tmp_path):
    # After 1 s the server asks the client to reconnect (GOAWAY); with no grace limit the
    # stream in flight runs to its end, and the next call opens a new connection.
    srv = _server(tmp_path, min_ping_interval_s=0.5, max_connection_age_s=1.0)
    try:
        with Client(srv.address, keepalive_s=1.0, retries=0) as client:
            col = client.create_collection("feed", models={"m": ["a", "b"]})
            scores = list(col.score_stream(_paused(3.0), model="m"))
            assert [t.num_rows for t in scores] == [1, 1]
            time.sleep(1.5)  # past the age of the connection that carried the stream
            assert client.list_collections() == ["feed"]
    finally:
        srv.stop(0)
    # With a grace limit, a stream still running when it is over is cut: the setting bites.
    srv = _server(tmp_path / "b", min_ping_interval_s=0.5, max_connection_age_s=1.0,
                  max_connection_age_grace_s=0.5)
    try:
        with Client(srv.address, keepalive_s=1.0, retries=0) as client:
            col = client.create_collection("feed", models={"m": ["a", "b"]})
            with pytest.raises(UnavailableError):
                list(col.score_stream(_paused(3.0), model="m"))
    finally:
        srv.stop(0)


def test_settings_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("ASSAY_MIN_PING_INTERVAL_S", "15")
    monkeypatch.setenv("ASSAY_MAX_CONNECTION_AGE_S", "3600")
    monkeypatch.setenv("ASSAY_KEEPALIVE_S", "90")
    from service.server import keepalive_options

    cfg = ServerConfig.from_env()
    assert (cfg.min_ping_interval_s, cfg.max_connection_age_s, cfg.keepalive_s) == (15.0, 3600.0, 90.0)
    options = dict(keepalive_options(cfg))
    assert options["grpc.http2.min_ping_interval_without_data_ms"] == 15_000
    assert options["grpc.max_connection_age_ms"] == 3_600_000
    assert "grpc.max_connection_age_grace_ms" not in options  # no limit: streams are not cut
    assert options["grpc.keepalive_time_ms"] == 90_000 and options["grpc.keepalive_permit_without_calls"] == 1
    # The Python client's pings (every 60 s by default) are well within what the server allows.
    from service.client import DEFAULT_KEEPALIVE_S

    assert ServerConfig().min_ping_interval_s <= DEFAULT_KEEPALIVE_S


def test_channel_options_given_replace_the_defaults():
    from service.client import channel_options

    options = channel_options(extra=[("grpc.keepalive_time_ms", 5_000)], keepalive_s=30)
    names = [k for k, _ in options]
    assert len(names) == len(set(names))  # gRPC would keep the first of two
    assert dict(options)["grpc.keepalive_time_ms"] == 5_000
    assert dict(channel_options(keepalive_s=30))["grpc.keepalive_time_ms"] == 30_000

