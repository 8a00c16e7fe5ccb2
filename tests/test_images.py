"""Images from URIs (indexing.images): local paths, file:// and s3:// against a moto S3 server
on loopback; bulk ingest and the CLIP embedder reading s3:// URIs."""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from indexing import images
from indexing.embedders import ClipEmbedder
from indexing.errors import InvalidArgument
from indexing.images import open_image, open_images
from indexing.ingest import ingest
from indexing.samples import render_digits
from indexing.store import Store

pytestmark = pytest.mark.s3

BUCKET = "images"
N = 6


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """The first N digit PNGs, local."""
    return render_digits(tmp_path_factory.mktemp("render") / "png")[:N]


@pytest.fixture(scope="module")
def bucket(moto_s3, digits):
    """The digits uploaded as s3://images/digits/<name>, plus a corrupt PNG; returns the
    endpoint."""
    import boto3

    client = boto3.client("s3", endpoint_url=moto_s3, aws_access_key_id="test",
                          aws_secret_access_key="test", region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    for p in digits:
        client.put_object(Bucket=BUCKET, Key=f"digits/{p.name}", Body=p.read_bytes())
    client.put_object(Bucket=BUCKET, Key="digits/corrupt.png", Body=b"\x89PNG\r\n\x1a\n not an image")
    return moto_s3


@pytest.fixture
def s3_env(bucket, monkeypatch):
    """The environment Store reads its object-store settings from, pointing at moto."""
    monkeypatch.setenv("ASSAY_S3_ENDPOINT", bucket)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    return bucket


def _s3(path) -> str:
    return f"s3://{BUCKET}/digits/{path.name}"


def _pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img)


def _local(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


# ---------------------------------------------------------------------------- open_image


def test_s3_images_equal_the_local_files(s3_env, digits):
    images._s3_filesystem.cache_clear()
    for p in digits:
        img = open_image(_s3(p))
        assert img.mode == "RGB"
        np.testing.assert_array_equal(_pixels(img), _local(p))
    # One filesystem for the whole batch, not one per image.
    assert images._s3_filesystem.cache_info().misses == 1


def test_explicit_storage_options_need_no_environment(bucket, digits, monkeypatch):
    for var in ("ASSAY_S3_ENDPOINT", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(var, raising=False)
    opts = {"endpoint": bucket, "allow_http": "true", "region": "us-east-1",
            "aws_access_key_id": "test", "aws_secret_access_key": "test"}
    np.testing.assert_array_equal(_pixels(open_image(_s3(digits[0]), storage_options=opts)),
                                  _local(digits[0]))


def test_open_images_keeps_order_and_reports_each_bad_uri(s3_env, digits):
    uris = [_s3(digits[0]), f"s3://{BUCKET}/digits/missing.png", str(digits[1]),
            "http://example.com/x.png", f"s3://{BUCKET}/digits/corrupt.png", _s3(digits[2])]
    out = open_images(uris, max_workers=4)
    assert [i for i, _ in out] == list(range(len(uris)))
    np.testing.assert_array_equal(_pixels(out[0][1]), _local(digits[0]))
    np.testing.assert_array_equal(_pixels(out[2][1]), _local(digits[1]))
    np.testing.assert_array_equal(_pixels(out[5][1]), _local(digits[2]))
    assert out[1][1] == f"cannot read image s3://{BUCKET}/digits/missing.png: no such object"
    assert "unsupported URI scheme 'http://'" in out[3][1]
    assert out[4][1].startswith(f"cannot read image s3://{BUCKET}/digits/corrupt.png: ")


def test_local_paths_file_uris_and_base_dir(tmp_path, digits):
    spaced = tmp_path / "a dir" / "digit one.png"
    spaced.parent.mkdir()
    shutil.copy(digits[1], spaced)
    expected = _local(digits[1])
    for uri, base in ((str(spaced), None), (spaced.as_uri(), None),  # file:///...%20...
                      ("digit one.png", spaced.parent), ("a dir/digit one.png", tmp_path)):
        np.testing.assert_array_equal(_pixels(open_image(uri, base_dir=base)), expected)
    with pytest.raises(InvalidArgument, match="no such file") as info:
        open_image("nope.png", base_dir=tmp_path)
    assert str(tmp_path / "nope.png") in str(info.value)


@pytest.mark.parametrize("uri", ["http://example.com/a.png", "gs://bucket/a.png", "ftp://h/a.png"])
def test_unsupported_scheme_is_a_clear_invalid_argument(uri):
    with pytest.raises(InvalidArgument) as info:
        open_image(uri)
    msg = str(info.value)
    assert uri in msg and "unsupported URI scheme" in msg and "s3://bucket/key" in msg
    assert info.value.field == "uri"


@pytest.mark.parametrize("uri", ["", "s3://bucket-only", "s3:///key.png"])
def test_malformed_uris(uri):
    with pytest.raises(InvalidArgument):
        open_image(uri)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("limit", [500, 1000])  # PIL's own error above 2x; ours from 1x
def test_decompression_bomb_is_refused(s3_env, digits, monkeypatch, limit):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)  # the digits are 32x32 = 1024 px
    for uri in (str(digits[0]), _s3(digits[0])):
        with pytest.raises(InvalidArgument, match="decompression bomb") as info:
            open_image(uri)
        assert uri in str(info.value)


def test_corrupt_local_file(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(InvalidArgument, match=f"cannot read image {bad}: "):
        open_image(str(bad))


# ---------------------------------------------------------------------------- ingest


def _vectors(table: pa.Table, column: str) -> np.ndarray:
    return np.stack(table.column(column).to_numpy(zero_copy_only=False)).astype(np.float32)


def test_ingest_parquet_of_s3_uris(tmp_path, tiny, s3_env, digits):
    name, ckpt = tiny
    # A local image next to the Parquet file, by relative path, in the same batch as s3 ones.
    (tmp_path / "local").mkdir()
    shutil.copy(digits[5], tmp_path / "local" / digits[5].name)
    rows = [(f"d{i}", _s3(p)) for i, p in enumerate(digits[:5])]
    rows.insert(3, ("missing", f"s3://{BUCKET}/digits/missing.png"))
    rows.insert(5, ("web", "http://example.com/x.png"))
    rows.append(("d5", f"local/{digits[5].name}"))
    src = tmp_path / "items.parquet"
    pq.write_table(pa.table({"id": [r[0] for r in rows], "uri": [r[1] for r in rows]}), src)

    store = Store(str(tmp_path / "data"))
    report = ingest(store, "digits", str(src), image_space="clip", clip_model=name,
                    clip_pretrained=ckpt, batch_rows=3, progress=False)
    assert (report.ingested, report.skipped, report.rows_read) == (6, 0, 8)
    assert [(b["row"], b["id"]) for b in report.bad] == [(3, "missing"), (5, "web")]
    assert report.bad[0]["reason"] == f"cannot read image s3://{BUCKET}/digits/missing.png: no such object"
    assert "unsupported URI scheme 'http://'" in report.bad[1]["reason"]

    ids = [f"d{i}" for i in range(6)]
    got = store.collection("digits").take(ids, ["id", "uri", "emb_clip"])
    assert got.column("id").to_pylist() == ids
    assert got.column("uri").to_pylist()[:5] == [_s3(p) for p in digits[:5]]
    expected = ClipEmbedder(name, pretrained=ckpt, device="cpu").embed_images(
        [str(p) for p in digits])
    np.testing.assert_allclose(_vectors(got, "emb_clip"), expected, atol=1e-5)

    # Resumable as before: the good rows are skipped, the bad ones reported again.
    again = ingest(store, "digits", str(src), image_space="clip", clip_model=name,
                   clip_pretrained=ckpt, batch_rows=3, progress=False)
    assert (again.ingested, again.skipped, len(again.bad)) == (0, 6, 2)


def test_ingest_into_an_s3_store_reads_images_with_its_options(tmp_path, tiny, s3_env, digits,
                                                              monkeypatch):
    name, ckpt = tiny
    store = Store(f"s3://{BUCKET}/db")  # endpoint and credentials from the environment...
    for var in ("ASSAY_S3_ENDPOINT", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(var)  # ...which is gone by the time the images are read
    images._s3_filesystem.cache_clear()
    src = tmp_path / "items.parquet"
    pq.write_table(pa.table({"id": ["a", "b"], "uri": [_s3(digits[0]), _s3(digits[1])]}), src)
    report = ingest(store, "digits", str(src), image_space="clip", clip_model=name,
                    clip_pretrained=ckpt, progress=False)
    assert (report.ingested, report.bad) == (2, [])
    got = store.collection("digits").take(["a", "b"], ["emb_clip"])
    expected = ClipEmbedder(name, pretrained=ckpt, device="cpu").embed_images(
        [str(digits[0]), str(digits[1])])
    np.testing.assert_allclose(_vectors(got, "emb_clip"), expected, atol=1e-5)


# ---------------------------------------------------------------------------- ClipEmbedder


def test_clip_embedder_reads_s3_uris_once_each(tiny, s3_env, digits, monkeypatch):
    name, ckpt = tiny
    emb = ClipEmbedder(name, pretrained=ckpt, device="cpu")
    local = emb.embed_images([str(p) for p in digits[:2]])

    read: list[str] = []
    real = images.open_images

    def counting(uris, **kw):
        read.extend(uris)
        return real(uris, **kw)

    monkeypatch.setattr(images, "open_images", counting)
    uris = [_s3(digits[0]), str(digits[1]), _s3(digits[0]), digits[1].as_uri()]
    vecs = emb.embed_images(uris)
    np.testing.assert_allclose(vecs, local[[0, 1, 0, 1]], atol=1e-5)
    # The same object (or file, however spelt) is read and embedded once.
    assert read == [_s3(digits[0]), str(digits[1])]

    missing = f"s3://{BUCKET}/digits/missing.png"
    with pytest.raises(InvalidArgument, match=r"images\[1\]: cannot read image .*missing.png") as info:
        emb.embed_images([_s3(digits[0]), missing])
    assert info.value.row == 1
    with pytest.raises(InvalidArgument, match="unsupported URI scheme") as info:
        emb.embed_images([str(digits[0]), "http://example.com/x.png"])
    assert info.value.row == 1
