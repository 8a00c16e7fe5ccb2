"""Token scopes (read-only vs read-write), per-token rate limits and mutual TLS, against a
real server on loopback."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest

from service.client import (
    AssayClientError,
    Client,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
)
from service.interceptor import READ_ONLY_METHODS, RateLimiter
from service.server import ServerConfig, start_server


@pytest.fixture(scope="module")
def scoped(tmp_path_factory):
    srv = start_server(ServerConfig(data=str(tmp_path_factory.mktemp("auth")), port=0, grace_s=1,
                                    tokens=("writer",), read_tokens=("reader",)))
    with Client(srv.address, token="writer") as w:
        col = w.create_collection("c", spaces={"v": 4}, models={"m": ["a", "b"]})
        col.upsert({"id": [f"r{i}" for i in range(20)], "label": ["a", "b"] * 10,
                    "emb_v": np.random.default_rng(0).standard_normal((20, 4)).astype(np.float32),
                    "pred_m": [{"probs": [0.5 + i / 50, 0.5 - i / 50]} for i in range(20)]})
    yield srv
    srv.stop(1)


def test_a_read_only_token_reads_but_cannot_change_anything(scoped):
    with Client(scoped.address, token="reader", retries=0) as r:
        col = r.collection("c")
        version = col.describe()["version"]
        assert r.list_collections() == ["c"] and col.count() == 20
        assert col.search("v", np.ones(4, np.float32), k=3).num_rows == 3
        assert col.take(["r1"]).num_rows == 1
        writes = {
            "upsert": lambda: col.upsert({"id": ["x"], "label": ["a"]}),
            "delete": lambda: col.delete(ids=["r1"]),
            "drop": lambda: r.drop_collection("c"),
            "create": lambda: r.create_collection("d"),
            "job": lambda: col.optimize(),
            "mine": lambda: col.mine("margin", 3, model="m"),
        }
        for name, call in writes.items():
            with pytest.raises(PermissionDeniedError, match="read-only") as err:
                call()
            assert err.value.code == "PERMISSION_DENIED", name
        assert col.describe()["version"] == version and r.list_collections() == ["c"]
    with Client(scoped.address, token="writer") as w:  # the read-write token may
        job = w.collection("c").mine("margin", 3, model="m").wait(timeout=60)
        assert len(job.results()) == 3
    with Client(scoped.address, token="nobody", retries=0) as x, pytest.raises(UnauthenticatedError):
        x.list_collections()


def test_every_read_only_method_exists_and_no_write_is_listed():
    from protos.assay.v1 import (
        collections_pb2,
        datasets_pb2,
        ingest_pb2,
        jobs_pb2,
        mining_pb2,
        query_pb2,
        scoring_pb2,
        search_pb2,
    )

    methods = {m.name for mod in (collections_pb2, datasets_pb2, ingest_pb2, jobs_pb2, mining_pb2,
                                  query_pb2, scoring_pb2, search_pb2)
               for svc in mod.DESCRIPTOR.services_by_name.values() for m in svc.methods}
    writes = {"CreateCollection", "DropCollection", "AddSpace", "AddModel", "Upsert", "UpsertBatch", "Delete",
              "TagItems", "StartJob", "CancelJob", "StartMining", "CancelRun", "CreateDataset", "DeleteDataset",
              "AddMembers", "RemoveMembers", "Discard", "Commit", "TagVersion"}
    assert writes <= methods and not (writes & READ_ONLY_METHODS)
    assert methods - writes <= READ_ONLY_METHODS  # every other method is a read
    assert methods >= READ_ONLY_METHODS  # no stale names


def test_rate_limit_answers_resource_exhausted_with_the_limit(tmp_path):
    srv = start_server(ServerConfig(data=str(tmp_path / "d"), port=0, grace_s=1, tokens=("t", "u"),
                                    rate_limit=2, rate_burst=3))
    try:
        with Client(srv.address, token="t", retries=0) as c:
            for _ in range(3):
                c.list_collections()
            with pytest.raises(ResourceExhaustedError, match=r"2 calls/s per token \(burst 3\)"):
                c.list_collections()
        with Client(srv.address, token="u", retries=0) as other:  # buckets are per token
            other.list_collections()
    finally:
        srv.stop(1)


def test_without_auth_every_caller_shares_the_anonymous_bucket_whatever_token_it_sends(tmp_path):
    srv = start_server(ServerConfig(data=str(tmp_path / "d"), port=0, grace_s=1, rate_limit=1, rate_burst=2))
    try:
        for token in ("a", "b"):
            with Client(srv.address, token=token, retries=0) as c:
                c.list_collections()
        with Client(srv.address, token="c", retries=0) as c, pytest.raises(ResourceExhaustedError):
            c.list_collections()
        assert list(srv._rate_limiter._buckets) == [b""]
    finally:
        srv.stop(1)


def test_rate_limiter_refills_at_its_rate():
    limiter = RateLimiter(10, 2)
    assert limiter.allow(b"k") and limiter.allow(b"k") and not limiter.allow(b"k")
    import time

    time.sleep(0.25)  # 2.5 calls' worth, capped at the burst of 2
    assert limiter.allow(b"k") and limiter.allow(b"k") and not limiter.allow(b"k")


def _cert(subject: str, key, issuer_name, issuer_key, *, ca: bool = False, dns: str | None = None):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer_name or name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=1)).not_valid_after(now + dt.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if dns:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(dns)]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _pki(tmp_path, name: str):
    """A CA, and a server (localhost) and a client certificate it signed, as PEM files."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    def pem_key(k) -> bytes:
        return k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                               serialization.NoEncryption())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert(f"{name} CA", ca_key, None, ca_key, ca=True)
    out = {}
    for role, dns in (("server", "localhost"), ("client", None)):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _cert(f"{name} {role}", key, ca.subject, ca_key, dns=dns)
        (tmp_path / f"{name}-{role}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (tmp_path / f"{name}-{role}.key").write_bytes(pem_key(key))
        out[role] = (tmp_path / f"{name}-{role}.pem", tmp_path / f"{name}-{role}.key")
    (tmp_path / f"{name}-ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    out["ca"] = tmp_path / f"{name}-ca.pem"
    return out


def test_mutual_tls_requires_a_client_certificate_signed_by_the_ca(tmp_path):
    good, rogue = _pki(tmp_path, "good"), _pki(tmp_path, "rogue")
    srv = start_server(ServerConfig(
        data=str(tmp_path / "d"), host="localhost", port=0, grace_s=1, tokens=("t",),
        tls_cert=str(good["server"][0]), tls_key=str(good["server"][1]), tls_client_ca=str(good["ca"])))
    target = f"localhost:{srv.port}"
    try:
        with Client(target, token="t", tls=True, root_certificates=str(good["ca"]),
                    client_cert=str(good["client"][0]), client_key=str(good["client"][1])) as c:
            c.create_collection("m")
            assert c.list_collections() == ["m"]
        for cert, key in ((None, None), rogue["client"]):  # no certificate, or one another CA signed
            with Client(target, token="t", tls=True, root_certificates=str(good["ca"]), timeout=3, retries=0,
                        client_cert=None if cert is None else str(cert),
                        client_key=None if key is None else str(key)) as bad, pytest.raises(AssayClientError):
                bad.list_collections()
    finally:
        srv.stop(1)
    with pytest.raises(ValueError, match="mutual TLS"):
        start_server(ServerConfig(data=str(tmp_path / "e"), port=0, tls_client_ca=str(good["ca"])))
