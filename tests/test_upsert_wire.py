"""The server's side of ``Upsert`` below the store: its reader of ``UpsertRequest``
(zero-copy Arrow payload) against protobuf's own parser, on what the client writes and on
everything else the wire format allows; and the stream's read-ahead, which hands the commit
loop the batches that arrived while the last commit ran."""

from __future__ import annotations

import threading
import time

import pyarrow as pa
import pytest
from google.protobuf.message import DecodeError

from protos.assay.v1 import ingest_pb2
from service.arrow_ipc import table_to_ipc
from service.client.upsert import EncodedBatch, ipc_size, serialize_request
from service.servicers import UpsertMessage, _ReadAhead, read_upsert_request


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, wire: int, value: bytes | int) -> bytes:
    key = _varint((number << 3) | wire)
    if wire == 0:
        return key + _varint(value)
    if wire == 2:
        return key + _varint(len(value)) + value
    return key + value  # fixed64 / fixed32: the bytes as given


def _same(raw: bytes) -> UpsertMessage:
    want = ingest_pb2.UpsertRequest.FromString(raw)
    got = read_upsert_request(raw)
    assert isinstance(got, UpsertMessage)
    assert (got.collection, got.seq, bytes(got.arrow_ipc)) == (want.collection, want.seq, want.arrow_ipc)
    return got


def test_what_the_client_writes_is_read_without_copying_the_payload():
    table = pa.table({"id": ["a", "b", "c"], "x": [1.0, 2.0, 3.0]})
    batch = EncodedBatch(seq=41, offset=0, rows=3, table=table, nbytes=ipc_size(table))
    raw = serialize_request("pool", batch)
    got = _same(raw)
    assert got.arrow_ipc.obj is raw  # a view of the received bytes
    assert bytes(got.arrow_ipc) == table_to_ipc(table)


@pytest.mark.parametrize("raw", [
    b"",
    _field(2, 0, 7),
    _field(3, 2, b"\x00\x01") + _field(2, 0, 2**64 - 1) + _field(1, 2, "péché".encode()),  # any order
    _field(1, 2, b"a") + _field(1, 2, b"b") + _field(2, 0, 1) + _field(2, 0, 5),  # the last one wins
    _field(3, 2, b"first") + _field(3, 2, b"second"),
    # unknown fields of every wire type, and a known number with another wire type, are skipped
    _field(9, 0, 300) + _field(1, 2, b"c") + _field(10, 1, b"12345678") + _field(11, 5, b"1234")
    + _field(12, 2, b"xyz") + _field(2, 2, b"not a varint") + _field(2, 0, 3) + _field(3, 2, b"ipc"),
    _field(2, 0, 2**70 % 2**64),
])
def test_every_wire_layout_reads_as_protobuf_reads_it(raw):
    _same(raw)


@pytest.mark.parametrize("raw", [
    _field(1, 2, b"abc")[:-1],                    # truncated length-delimited field
    _field(2, 0, 2**40)[:-1],                     # truncated varint
    _field(0, 0, 1),                              # field number 0
    _field(1, 2, b"\xff\xfe"),                    # a collection that is not UTF-8
    _field(5, 1, b"123"),                         # truncated fixed64
])
def test_malformed_requests_raise_protobufs_error(raw):
    with pytest.raises(DecodeError):
        ingest_pb2.UpsertRequest.FromString(raw)
    with pytest.raises(DecodeError):
        read_upsert_request(raw)


def test_a_group_in_an_unknown_field_goes_to_protobufs_parser():
    raw = _field(2, 0, 9) + bytes([(4 << 3) | 3, (4 << 3) | 4]) + _field(3, 2, b"ipc")  # an empty group
    got = read_upsert_request(raw)
    assert isinstance(got, ingest_pb2.UpsertRequest) and (got.seq, got.arrow_ipc) == (9, b"ipc")


@pytest.mark.parametrize("collection, seq", [("pool", 3), ("", 0), ("p" * 130, 2**40), ("é" * 7, 1)])
def test_the_clients_requests_put_the_payload_on_an_aligned_offset(collection, seq):
    table = pa.table({"id": ["a", "b"], "v": pa.array([1.5, 2.5], pa.float64())})
    batch = EncodedBatch(seq=seq, offset=0, rows=2, table=table, nbytes=ipc_size(table))
    raw = serialize_request(collection, batch)
    got = _same(raw)
    assert (len(raw) - len(got.arrow_ipc)) % 8 == 0


def test_a_payload_at_an_odd_offset_is_read_into_aligned_buffers():
    import numpy as np

    from service.arrow_ipc import ipc_to_table

    table = pa.table({"x": pa.array(np.arange(1000, dtype=np.int64)), "f": pa.array(np.ones(1000))})
    raw = b"\x00" * 3 + table_to_ipc(table)
    view = memoryview(raw)[3:]
    assert pa.py_buffer(view).address % 8 != 0
    got = ipc_to_table(view)
    assert got.equals(table)
    for col in got.columns:
        for buf in col.chunk(0).buffers():
            assert buf is None or buf.address % 8 == 0


# -- the stream's read-ahead -------------------------------------------------------------------


class _Source:
    """Items 0, 1, ... (``fail_at``: raise there instead), counting those produced."""

    def __init__(self, stop: int | None = None, fail_at: int | None = None) -> None:
        self.stop, self.fail_at, self.produced = stop, fail_at, 0
        self.lock = threading.Lock()

    def __iter__(self):
        i = 0
        while self.stop is None or i < self.stop:
            if i == self.fail_at:
                raise ValueError(f"item {i} is bad")
            with self.lock:
                self.produced += 1
            yield i
            i += 1

    def wait_produced(self, n: int) -> None:
        deadline = time.monotonic() + 10
        while self.produced < n:
            assert time.monotonic() < deadline, f"only {self.produced} of {n} produced"
            time.sleep(0.005)


def test_read_ahead_holds_what_fits_its_budget_and_hands_over_what_is_ready():
    source = _Source(stop=10)
    ahead = _ReadAhead(iter(source), size=lambda i: 10, budget_bytes=30)
    items = iter(ahead)
    assert next(items) == 0
    # 3 items of 10 bytes fit 30: the helper produced a 4th and waits for room to put it
    source.wait_produced(5)
    time.sleep(0.1)
    assert source.produced == 5
    assert ahead.ready() == [1, 2, 3]
    source.wait_produced(8)  # room again: 4 is put, 5..7 produced and put while 8 waits
    assert list(items) == list(range(4, 10)) and ahead.ready() == []


def test_read_ahead_always_takes_one_item_over_the_budget():
    ahead = _ReadAhead(iter(range(3)), size=lambda i: 100, budget_bytes=1)
    assert list(ahead) == [0, 1, 2]


def test_read_ahead_raises_an_error_where_its_item_was_and_ready_stops_before_it():
    source = _Source(fail_at=3)
    ahead = _ReadAhead(iter(source), size=lambda i: 1, budget_bytes=100)
    items = iter(ahead)
    assert next(items) == 0
    source.wait_produced(3)
    time.sleep(0.05)  # the error is queued after item 2
    assert ahead.ready() == [1, 2]
    assert ahead.ready() == []
    with pytest.raises(ValueError, match="item 3 is bad"):
        next(items)


def test_leaving_the_loop_stops_the_helper():
    source = _Source()  # endless
    ahead = _ReadAhead(iter(source), size=lambda i: 1, budget_bytes=4)
    for item in ahead:
        if item == 2:
            break
    time.sleep(0.3)
    produced = source.produced
    time.sleep(0.3)
    assert source.produced == produced <= 8
