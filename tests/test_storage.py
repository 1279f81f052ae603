"""sami_worker.storage: the same behaviour on a local directory and on a real S3 server.

The `s3` cases run against SeaweedFS (`weed mini`, tests/s3server.py) with SigV4 auth enforced.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
import traceback
import uuid
from pathlib import Path

import pytest

from sami_worker.storage import (
    MANIFEST_NAME,
    KeyNotFound,
    MiB,
    S3Storage,
    StageIncomplete,
    StorageError,
    StorageSettings,
    TransientStorageError,
    download_stage,
    is_complete,
    open_storage,
    read_manifest,
    read_stage_file,
    upload_stage,
    write_stage_files,
)
from tests.s3server import S3Server


def s3_settings(server: S3Server, **overrides) -> StorageSettings:
    """Settings for the test server; fast retries so that fault tests stay short."""
    base = dict(
        endpoint_url=server.endpoint_url, region=server.region, force_path_style=True,
        max_attempts=4, backoff_base_s=0.05, backoff_cap_s=0.5,
    )  # fmt: skip
    return StorageSettings(**{**base, **overrides})


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def make_storage(request, tmp_path):
    """A factory for a fresh storage root on the backend under test; keyword arguments are
    StorageSettings overrides (the local backend has none to take)."""
    if request.param == "local":
        return lambda **_: open_storage(str(tmp_path / "store"))
    server, bucket = request.getfixturevalue("s3_server"), request.getfixturevalue("s3_bucket")
    return lambda **overrides: open_storage(
        f"s3://{bucket}/runs/r1", s3_settings(server, **overrides)
    )


@pytest.fixture
def storage(make_storage):
    return make_storage()


def write_tree(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


STAGE_FILES = {
    "config.json": b'{"layers": 2}',
    "data/a.jsonl": b'{"q": "hi"}\n' * 100,
    "data/b.bin": bytes(range(256)) * 40,
    "empty.txt": b"",
}


# --- the verbs -----------------------------------------------------------------------------


def test_write_read_exists_list(storage):
    assert not storage.exists("a/b.txt")
    storage.write_bytes("a/b.txt", b"one")
    storage.write_bytes("a/b.txt", b"two!")  # overwrite
    storage.write_bytes("a/c/d.txt", b"")
    storage.write_bytes("z.txt", b"zz")
    assert storage.exists("a/b.txt") and not storage.exists("a")
    assert storage.read_bytes("a/b.txt") == b"two!"
    assert storage.read_range("a/b.txt", 1, 2) == b"wo"  # a few items of a large file
    assert [(o.key, o.size) for o in storage.list()] == [
        ("a/b.txt", 4), ("a/c/d.txt", 0), ("z.txt", 2),
    ]  # fmt: skip
    assert [o.key for o in storage.list("a/c")] == ["a/c/d.txt"]
    assert storage.list("a/b.txt") == [] and storage.list("missing") == []
    suffix = "/runs/r1/a/b.txt" if isinstance(storage, S3Storage) else "/store/a/b.txt"
    assert storage.uri("a/b.txt").endswith(suffix)
    with pytest.raises(KeyNotFound, match="a/missing.txt"):
        storage.read_bytes("a/missing.txt")
    with pytest.raises(StorageError, match="'..'"):
        storage.read_bytes("../escape")


def test_child_and_delete_prefix(storage):
    ckpt = storage.child("ckpt")
    ckpt.write_bytes("1.bin", b"1")
    ckpt.child("shards").write_bytes("2.bin", b"22")
    storage.write_bytes("ckpt-old/3.bin", b"333")  # shares a string prefix, not the folder
    assert ckpt.uri() == storage.uri("ckpt") and ckpt.uri("1.bin") == storage.uri("ckpt/1.bin")
    assert storage.read_bytes("ckpt/shards/2.bin") == b"22"
    assert [o.key for o in ckpt.list()] == ["1.bin", "shards/2.bin"]
    storage.delete_prefix("ckpt")
    assert [o.key for o in storage.list()] == ["ckpt-old/3.bin"]
    storage.delete("ckpt-old/3.bin")
    storage.delete("ckpt-old/3.bin")  # deleting what is gone is fine
    storage.delete_prefix("nothing-here")
    assert storage.list() == []


def test_upload_and_download_file(storage, tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(100_000))
    storage.upload_file(src, "files/src.bin")
    dest = tmp_path / "out" / "deep" / "src.bin"
    storage.download_file("files/src.bin", dest)
    assert dest.read_bytes() == src.read_bytes()
    assert sorted(p.name for p in dest.parent.iterdir()) == ["src.bin"]  # no .part left behind
    with pytest.raises(KeyNotFound, match="files/nope.bin"):
        storage.download_file("files/nope.bin", tmp_path / "nope.bin")


def test_multipart_upload_above_threshold(make_storage, tmp_path, request):
    storage = make_storage(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB)
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(12 * MiB))
    storage.upload_file(src, "big/big.bin")
    if isinstance(storage, S3Storage):  # S3 marks multipart objects: ETag "<md5 of md5s>-<parts>"
        head = storage.client.head_object(Bucket=storage.bucket, Key="runs/r1/big/big.bin")
        assert head["ETag"].strip('"').endswith("-3") and head["ContentLength"] == 12 * MiB
    storage.download_file("big/big.bin", tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == src.read_bytes()


# --- stages --------------------------------------------------------------------------------


def test_stage_round_trip(storage, tmp_path):
    local = write_tree(tmp_path / "stage", STAGE_FILES)
    published = upload_stage(storage, local, "iter_1/generate", stage="generate_1", meta={"n": 2})
    assert is_complete(storage, "iter_1/generate")
    manifest = read_manifest(storage, "iter_1/generate")
    assert manifest == published and manifest.stage == "generate_1" and manifest.meta == {"n": 2}
    assert manifest.created.tzinfo is not None
    listed = {f.path: (f.size, f.sha256) for f in manifest.files}
    want = {k: (len(v), hashlib.sha256(v).hexdigest()) for k, v in STAGE_FILES.items()}
    assert listed == want
    # The manifest names exactly the stage's files and is itself the last object of the stage.
    keys = {o.key for o in storage.child("iter_1/generate").list()}
    assert keys == {*STAGE_FILES, MANIFEST_NAME}

    out = tmp_path / "out"
    assert download_stage(storage, "iter_1/generate", out) == manifest
    assert {k: (out / k).read_bytes() for k in STAGE_FILES} == STAGE_FILES
    # A second download keeps verified files instead of fetching them again.
    before = {k: (out / k).stat().st_mtime_ns for k in STAGE_FILES}
    download_stage(storage, "iter_1/generate", out)
    assert {k: (out / k).stat().st_mtime_ns for k in STAGE_FILES} == before
    assert read_stage_file(storage, "iter_1/generate", "data/b.bin") == STAGE_FILES["data/b.bin"]
    with pytest.raises(KeyNotFound, match="not listed"):
        read_stage_file(storage, "iter_1/generate", "data/other.bin")


def test_write_stage_files_round_trip(storage):
    files = {"principles.json": b'["be kind"]', "stats/summary.json": b"{}"}
    manifest = write_stage_files(storage, "principles", files, stage="principles", meta={"k": 3})
    assert is_complete(storage, "principles")
    assert read_manifest(storage, "principles") == manifest
    assert read_stage_file(storage, "principles", "principles.json") == b'["be kind"]'
    with pytest.raises(ValueError, match=MANIFEST_NAME):
        write_stage_files(storage, "bad", {MANIFEST_NAME: b"{}"}, stage="x")


def test_half_written_stage_is_not_complete(storage, tmp_path):
    # The files of a writer that died before its manifest: readers must not see a stage.
    for name, data in STAGE_FILES.items():
        storage.child("train").write_bytes(name, data)
    assert not is_complete(storage, "train")
    assert read_manifest(storage, "train") is None
    with pytest.raises(StageIncomplete, match=MANIFEST_NAME):
        download_stage(storage, "train", tmp_path / "out")
    with pytest.raises(StageIncomplete):
        read_stage_file(storage, "train", "config.json")
    # A manifest whose files are not all there is not complete either.
    upload_stage(storage, write_tree(tmp_path / "s", STAGE_FILES), "eval", stage="evaluate_1")
    storage.delete("eval/data/a.jsonl")
    assert not is_complete(storage, "eval")


def test_republishing_withdraws_the_old_manifest_first(storage, tmp_path, monkeypatch):
    write_stage_files(storage, "gen", {"a.txt": b"old"}, stage="generate_1")
    local = write_tree(tmp_path / "new", {"a.txt": b"new!", "b.txt": b"b"})
    # The writer dies after the first file of the new version: the old manifest must not vouch
    # for the mix of new and old files.
    real_upload = type(storage).upload_file
    calls = []

    def dying_upload(self, path, key):
        calls.append(key)
        if len(calls) == 2:
            raise RuntimeError("writer killed")
        real_upload(self, path, key)

    monkeypatch.setattr(type(storage), "upload_file", dying_upload)
    with pytest.raises(RuntimeError):
        upload_stage(storage, local, "gen", stage="generate_1")
    assert read_manifest(storage, "gen") is None and not is_complete(storage, "gen")


def test_corrupted_file_fails_download(storage, tmp_path):
    upload_stage(storage, write_tree(tmp_path / "s", STAGE_FILES), "gen", stage="generate_1")
    bad = bytes(reversed(STAGE_FILES["data/b.bin"]))  # same size, other bytes
    storage.write_bytes("gen/data/b.bin", bad)
    assert is_complete(storage, "gen")  # the cheap check looks at sizes only
    out = tmp_path / "out"
    with pytest.raises(StorageError, match="data/b.bin.*does not match its manifest") as err:
        download_stage(storage, "gen", out)
    assert not isinstance(err.value, StageIncomplete)
    assert not (out / "data" / "b.bin").exists()  # no corrupt copy left to pass for a good one
    with pytest.raises(StorageError, match="data/b.bin"):
        read_stage_file(storage, "gen", "data/b.bin")


def test_corrupt_manifest_is_an_error_naming_it(storage):
    storage.write_bytes(f"gen/{MANIFEST_NAME}", b'{"stage": "x", "files": [')
    with pytest.raises(StorageError, match=f"gen/{MANIFEST_NAME}.*not a valid stage manifest"):
        read_manifest(storage, "gen")
    storage.write_bytes(
        f"gen/{MANIFEST_NAME}", b'{"stage": "x", "created": "2026-01-01T00:00:00Z"}'
    )
    with pytest.raises(StorageError, match="files"):
        is_complete(storage, "gen")


def test_open_storage_uris(tmp_path):
    assert open_storage(tmp_path.as_uri()).uri("k") == (tmp_path / "k").as_uri()
    assert open_storage(str(tmp_path)).uri() == tmp_path.as_uri()
    s3 = open_storage("s3://bucket/some/prefix/")
    assert isinstance(s3, S3Storage) and s3.uri("k") == "s3://bucket/some/prefix/k"
    for bad in ("s3:///no-bucket", "gs://bucket/x", "file://host/x"):
        with pytest.raises(StorageError, match="expected|file:///"):
            open_storage(bad)


# --- S3 only: resume, errors, faults -------------------------------------------------------


@pytest.mark.s3
def test_download_resumes_from_part_file(s3_server, s3_bucket, tmp_path):
    storage = open_storage(f"s3://{s3_bucket}/r", s3_settings(s3_server))
    data = os.urandom(3 * MiB)
    storage.write_bytes("ckpt/model.bin", data)
    etag = storage.client.head_object(Bucket=s3_bucket, Key="r/ckpt/model.bin")["ETag"]
    ranges = []
    storage.client.meta.events.register(
        "before-send.s3.GetObject", lambda request, **_: ranges.append(request.headers["Range"])
    )
    half = len(data) // 2
    dest = tmp_path / "model.bin"
    # An interrupted earlier download: zeros stand in for the first half, so the result shows
    # which bytes came from the .part file and which from the server.
    Path(f"{dest}.part").write_bytes(bytes(half))
    Path(f"{dest}.part.etag").write_text(etag)
    storage.download_file("ckpt/model.bin", dest)
    assert ranges == [f"bytes={half}-".encode()]
    assert dest.read_bytes() == bytes(half) + data[half:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.bin"]

    # A .part of another version of the object (ETag differs) is thrown away, not resumed.
    Path(f"{dest}.part").write_bytes(bytes(half))
    Path(f"{dest}.part.etag").write_text('"stale-etag"')
    storage.download_file("ckpt/model.bin", dest)
    assert ranges[-1] == b"bytes=0-" and dest.read_bytes() == data


@pytest.mark.s3
def test_large_file_downloads_in_parallel_ranges(s3_server, s3_bucket, tmp_path):
    """Above download_threshold: one ranged GET per part, several at once, into a temp file
    renamed into place; the bytes are the object's."""
    settings = s3_settings(
        s3_server, download_threshold=MiB, download_part_size=MiB, download_concurrency=4
    )
    storage = open_storage(f"s3://{s3_bucket}/r", settings)
    data = os.urandom(5 * MiB + 12345)
    storage.write_bytes("ckpt/big.bin", data)
    seen: list[tuple[bytes, int]] = []
    storage.client.meta.events.register(
        "before-send.s3.GetObject",
        lambda request, **_: seen.append((request.headers["Range"], threading.get_ident())),
    )
    dest = tmp_path / "out" / "big.bin"
    storage.download_file("ckpt/big.bin", dest)
    assert dest.read_bytes() == data
    size = len(data)
    want = [f"bytes={a}-{min(a + MiB, size) - 1}".encode() for a in range(0, size, MiB)]
    assert sorted(r for r, _ in seen) == sorted(want)
    assert len({thread for _, thread in seen}) > 1  # not one stream after another
    assert [p.name for p in dest.parent.iterdir()] == ["big.bin"]  # no temp file left

    # At the threshold itself: one plain stream, as before.
    storage.write_bytes("ckpt/small.bin", data[:MiB])
    seen.clear()
    storage.download_file("ckpt/small.bin", tmp_path / "small.bin")
    assert [r for r, _ in seen] == [b"bytes=0-"]
    assert (tmp_path / "small.bin").read_bytes() == data[:MiB]


@pytest.mark.s3
def test_wrong_secret_fails_fast_without_leaking_credentials(s3_server, s3_bucket, monkeypatch):
    wrong = "wrong-secret-" + uuid.uuid4().hex
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong)
    storage = open_storage(f"s3://{s3_bucket}/r", s3_settings(s3_server))
    for op in (
        lambda: storage.read_bytes("ckpt/x.bin"),
        lambda: storage.write_bytes("ckpt/x.bin", b"1"),
    ):
        start = time.monotonic()
        with pytest.raises(StorageError) as err:
            op()
        assert time.monotonic() - start < 2  # permanent: no retries
        assert not isinstance(err.value, TransientStorageError)
        text = "".join(traceback.format_exception(err.value))  # the chained causes too
        assert s3_bucket in str(err.value) and "ckpt/x.bin" in str(err.value)
        assert "SignatureDoesNotMatch" in str(err.value)
        for secret in (wrong, s3_server.secret_key, s3_server.access_key):
            assert secret not in text


@pytest.mark.s3
def test_missing_bucket_and_key(s3_server, s3_bucket):
    bucket = f"sami-missing-{uuid.uuid4().hex[:8]}"
    missing = open_storage(f"s3://{bucket}/r", s3_settings(s3_server))
    for op in (
        missing.list,
        lambda: missing.read_bytes("k"),
        lambda: missing.write_bytes("k", b""),
    ):
        with pytest.raises(StorageError, match=f"NoSuchBucket: bucket '{bucket}'") as err:
            op()
        assert not isinstance(err.value, KeyNotFound)
    storage = open_storage(f"s3://{s3_bucket}/r", s3_settings(s3_server))
    with pytest.raises(KeyNotFound, match=f"s3://{s3_bucket}/r/no/such.key"):
        storage.read_bytes("no/such.key")
    assert not storage.exists("no/such.key")


@pytest.mark.s3
def test_server_that_stays_down_fails_after_bounded_retries(s3_env, caplog):
    from tests.s3server import _free_ports

    dead = f"http://127.0.0.1:{_free_ports(1)[0]}"  # nothing listens there
    settings = StorageSettings(
        endpoint_url=dead, force_path_style=True, max_attempts=3, request_attempts=2,
        backoff_base_s=0.05, backoff_cap_s=0.2,
    )  # fmt: skip
    storage = open_storage("s3://bucket/r", settings)
    caplog.set_level(logging.WARNING, logger="sami_worker.storage")
    start = time.monotonic()
    with pytest.raises(TransientStorageError, match="gave up after 3 attempts") as err:
        storage.write_bytes("ckpt/x.bin", b"1")
    assert time.monotonic() - start < 5
    assert "PUT s3://bucket/r/ckpt/x.bin" in str(err.value)
    assert "EndpointConnectionError" in str(err.value)
    retries = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(retries) == 2 and all("PUT s3://bucket/r/ckpt/x.bin" in m for m in retries)


@pytest.mark.s3
@pytest.mark.slow
def test_stage_upload_survives_a_server_restart(
    s3_server, s3_bucket, tmp_path, monkeypatch, caplog
):
    """Stop the server after the first file of a stage, start it again 2 s later: the upload
    completes through retries, and no reader ever sees the stage before its manifest."""
    files = {f"shard_{i}.bin": os.urandom(200_000) for i in range(4)}
    local = write_tree(tmp_path / "stage", files)
    uri = f"s3://{s3_bucket}/run"
    # Outer retries must outlast the outage (2 s down plus up to ~5 s to restart).
    writer = open_storage(uri, s3_settings(s3_server, max_attempts=40, request_attempts=2,
                                           backoff_base_s=0.2, backoff_cap_s=0.5))  # fmt: skip
    reader = open_storage(uri, s3_settings(s3_server, max_attempts=1, request_attempts=1))
    first_done, resume, publishing = threading.Event(), threading.Event(), threading.Event()
    may_publish, finished = threading.Event(), threading.Event()
    real_upload, real_write = S3Storage.upload_file, S3Storage.write_bytes

    def upload_file(self, path, key):
        real_upload(self, path, key)
        if not first_done.is_set():
            first_done.set()
            resume.wait(30)

    def write_bytes(self, key, data):
        if key == MANIFEST_NAME:
            publishing.set()
            may_publish.wait(30)
        real_write(self, key, data)

    monkeypatch.setattr(S3Storage, "upload_file", upload_file)
    monkeypatch.setattr(S3Storage, "write_bytes", write_bytes)
    caplog.set_level(logging.WARNING, logger="sami_worker.storage")
    outcome: dict[str, object] = {}

    def publish():
        try:
            outcome["manifest"] = upload_stage(writer, local, "gen_1", stage="generate_1")
        except BaseException as exc:
            outcome["error"] = exc
        finished.set()

    sightings = []  # (is_complete, manifest write already begun) as a polling reader saw them

    def poll():
        while not finished.is_set():
            try:
                sightings.append((is_complete(reader, "gen_1"), publishing.is_set()))
            except StorageError:
                pass  # the server is down
            time.sleep(0.05)

    threads = [threading.Thread(target=publish), threading.Thread(target=poll)]
    for t in threads:
        t.start()
    try:
        assert first_done.wait(30)
        s3_server.stop()
        resume.set()  # the second file now meets a dead server
        time.sleep(2)
        s3_server.start()
        # The server is back and the writer is retrying or uploading: there is no stage yet.
        assert not is_complete(reader, "gen_1")
        with pytest.raises(StageIncomplete):
            download_stage(reader, "gen_1", tmp_path / "early")
        may_publish.set()
        assert finished.wait(60)
    finally:
        resume.set()
        may_publish.set()
        if s3_server.proc is None:
            s3_server.start()
        for t in threads:
            t.join(60)
    assert "error" not in outcome, outcome.get("error")
    assert any("upload" in r.getMessage() for r in caplog.records), "no retry was logged"
    assert sightings and all(published for complete, published in sightings if complete)
    assert is_complete(reader, "gen_1")
    download_stage(reader, "gen_1", tmp_path / "out")
    assert {k: (tmp_path / "out" / k).read_bytes() for k in files} == files
