"""Fetching model and checkpoint folders from S3 into the node's cache (`fetch_model`,
`storage.fetch_folder`): once per machine however many processes ask at the same time,
recovered after a fetcher is killed, and never writing outside the cache.

Several training ranks (torchrun) and pods sharing a cache volume call `fetch_model` on the
same URI at once; these tests start real processes ('spawn') against the real S3 server of
tests/s3server.py. How many bytes each process fetched comes from
`storage.download_counts()`, which counts GetObject requests and the body bytes received in
that process: a second download anywhere shows up as bytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import signal
import socket
import time
from pathlib import Path

import pytest

from sami_operator.models import StorageSpec
from sami_worker import storage
from sami_worker.common import fetch_model, scratch_dir
from sami_worker.storage import (
    FETCHED_MARKER,
    MANIFEST_NAME,
    MiB,
    StorageError,
    download_counts,
    fetch_folder,
    open_storage,
    upload_stage,
)
from tests.test_storage import s3_settings, write_tree

pytestmark = pytest.mark.s3
PROCESSES = 4


def digests(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under root."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def expected(files: dict[str, bytes]) -> dict[str, str]:
    return {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}


# --- child processes (module level: 'spawn' imports them by name) --------------------------


class _Messages(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _fetch_model_child(uri: str, spec: dict, barrier, results) -> None:
    """One rank: wait for the others, fetch, report what it fetched and whether it waited."""
    handler = _Messages()
    logger = logging.getLogger("sami_worker.storage")
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    storage_spec = StorageSpec.model_validate(spec)
    barrier.wait(timeout=60)
    try:
        path = fetch_model(uri, storage_spec)
        results.put(
            {
                "pid": os.getpid(),
                "path": str(path),
                "counts": download_counts(),
                "waited": any("waiting for it" in m for m in handler.messages),
            }
        )
    except BaseException as exc:
        results.put({"pid": os.getpid(), "error": repr(exc)})


def _fetch_then_hang_child(uri: str, settings: dict, target: str, stop_after: int, results):
    """A fetcher that stops for good after `stop_after` files (the test then kills it): the
    state a node is left in when a pod is killed mid-download."""
    done: list[str] = []
    real = storage.S3Storage.download_file

    def download_file(self, key, local_path):
        real(self, key, local_path)
        done.append(key)
        if len(done) == stop_after:
            results.put({"done": list(done), "pid": os.getpid()})
            time.sleep(3600)

    storage.S3Storage.download_file = download_file
    fetch_folder(open_storage(uri, storage.StorageSettings(**settings)), Path(target))


# --- the tests ------------------------------------------------------------------------------


@pytest.mark.parametrize("published", [True, False], ids=["manifest", "plain"])
def test_processes_fetching_at_once_download_once(
    s3_server, s3_bucket, tmp_path, monkeypatch, published
):
    """PROCESSES processes call fetch_model on the same URI and cache at the same moment:
    all get the same verified folder, one of them fetched it, the others fetched nothing."""
    files = {
        "config.json": b'{"layers": 2}',
        "tokenizer.json": os.urandom(300_000),
        "shards/model-00001.safetensors": os.urandom(6 * MiB),
        "shards/model-00002.safetensors": os.urandom(5 * MiB + 7),
    }
    if published:  # above the default ranged threshold: fetch_model's ranged path, too
        files["shards/model-00003.safetensors"] = os.urandom(64 * MiB + 4099)
    uri = f"s3://{s3_bucket}/models/m1"
    remote = open_storage(uri, s3_settings(s3_server))
    if published:
        upload_stage(remote, write_tree(tmp_path / "src", files), "", stage="train_1")
        manifest_bytes = remote.client.head_object(
            Bucket=s3_bucket, Key=f"models/m1/{MANIFEST_NAME}"
        )["ContentLength"]
    else:
        for name, data in files.items():
            remote.write_bytes(name, data)
        manifest_bytes = 0
    cache = tmp_path / "cache"
    monkeypatch.setenv("SAMI_CACHE_DIR", str(cache))  # the children inherit the environment
    spec = {"uri": uri, "endpointUrl": s3_server.endpoint_url, "region": s3_server.region,
            "forcePathStyle": True}  # fmt: skip

    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(PROCESSES), ctx.Queue()
    procs = [
        ctx.Process(target=_fetch_model_child, args=(uri, spec, barrier, results))
        for _ in range(PROCESSES)
    ]
    for p in procs:
        p.start()
    try:
        reports = [results.get(timeout=180) for _ in procs]
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    assert all("error" not in r for r in reports), reports
    target = Path(reports[0]["path"])
    assert {r["path"] for r in reports} == {str(target)}
    assert target.parent == cache / "downloads"
    got = digests(target)
    marker = json.loads((target / FETCHED_MARKER).read_text())
    del got[FETCHED_MARKER]
    assert got == expected(files)  # the manifest itself is not part of the model folder

    fetchers = [r for r in reports if r["counts"]["get_bytes"]]
    assert len(fetchers) == 1, [r["counts"] for r in reports]
    assert fetchers[0]["counts"]["get_bytes"] == sum(map(len, files.values())) + manifest_bytes
    assert marker["pid"] == fetchers[0]["pid"] and marker["files"] == len(files)
    others = [r for r in reports if r is not fetchers[0]]
    assert all(r["counts"]["get_requests"] == 0 for r in others)
    # The processes did overlap: at least one found the lock taken and waited.
    assert any(r["waited"] for r in others), reports
    # No temporary folder, lock holder's leftovers or second copy next to the target.
    assert sorted(p.name for p in cache.joinpath("downloads").iterdir()) == [
        target.name, f"{target.name}.lock",
    ]  # fmt: skip

    # Later calls in this process find the completed folder: no request, nothing rewritten.
    before = download_counts()
    mtimes = {p: p.stat().st_mtime_ns for p in target.rglob("*")}
    assert fetch_model(uri, StorageSpec.model_validate(spec)) == target
    assert download_counts() == before
    assert {p: p.stat().st_mtime_ns for p in target.rglob("*")} == mtimes


def test_killed_fetch_is_resumed_by_the_next_caller(s3_server, s3_bucket, tmp_path):
    """A fetcher killed after two of five files (holding the lock) leaves `.fetching`; the
    next caller takes the freed lock, keeps what is complete, resumes a `.part`, drops temp
    files and strays, and fetches only the rest."""
    files = {f"shard-{i}.bin": os.urandom(MiB + 1000 * i) for i in range(5)}
    uri = f"s3://{s3_bucket}/ckpt/step-3"
    settings = s3_settings(s3_server, download_concurrency=1)  # one file at a time
    remote = open_storage(uri, settings)
    upload_stage(remote, write_tree(tmp_path / "src", files), "", stage="train-state")
    target = tmp_path / "cache" / "downloads" / "ckpt"

    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    child = ctx.Process(
        target=_fetch_then_hang_child,
        args=(uri, settings.model_dump(), str(target), 2, results),
    )
    child.start()
    try:
        report = results.get(timeout=120)
    finally:
        child.kill()
        child.join(30)
    assert child.exitcode == -signal.SIGKILL
    fetching = target.with_name("ckpt.fetching")
    kept = report["done"]
    assert len(kept) == 2 and not target.exists()
    assert {p.name for p in fetching.iterdir()} >= set(kept)

    # What else a crash can leave: half of the next file's stream, a ranged download's temp
    # file, and a file the remote folder no longer holds.
    resumed = next(name for name in sorted(files) if name not in kept)
    half = len(files[resumed]) // 2
    fetching.joinpath(f"{resumed}.part").write_bytes(files[resumed][:half])
    etag = remote.client.head_object(Bucket=s3_bucket, Key=f"ckpt/step-3/{resumed}")["ETag"]
    fetching.joinpath(f"{resumed}.part.etag").write_text(etag)
    fetching.joinpath(f".{resumed}.x1y2.sami-tmp").write_bytes(b"\0" * 1000)
    fetching.joinpath("stale.bin").write_bytes(b"old")

    before = download_counts()
    assert fetch_folder(remote, target) == target  # would block forever on a leaked lock
    fetched = download_counts()["get_bytes"] - before["get_bytes"]
    manifest_bytes = len(remote.read_bytes(MANIFEST_NAME))
    missing = sum(len(files[n]) for n in files if n not in kept) - half
    assert fetched == missing + manifest_bytes
    got = digests(target)
    del got[FETCHED_MARKER]
    assert got == expected(files)
    assert not fetching.exists()


def test_unmarked_folder_is_not_trusted(s3_server, s3_bucket, tmp_path):
    """A folder at the target without the completion marker (an older sami's download, which
    wrote into place) is checked and completed, not returned as it is."""
    files = {"config.json": b"{}", "model.bin": os.urandom(2 * MiB)}
    remote = open_storage(f"s3://{s3_bucket}/models/m2", s3_settings(s3_server))
    upload_stage(remote, write_tree(tmp_path / "src", files), "", stage="train_1")
    target = tmp_path / "cache" / "m2"
    write_tree(target, {"config.json": b"{}", "model.bin": b"truncated"})
    fetch_folder(remote, target)
    got = digests(target)
    del got[FETCHED_MARKER]
    assert got == expected(files)


@pytest.mark.parametrize(
    "key", ["/abs/path.bin", "../../escape.bin", "sub/../../escape.bin", "./x.bin", "a//b.bin"]
)
def test_listed_keys_that_would_escape_the_folder_are_refused(tmp_path, key):
    """AWS S3 takes any string as a key: `m//abs/path.bin` lists under `m/` as `/abs/path.bin`,
    which joined to a folder is an absolute path. (The test server normalises `//` and refuses
    `..`, so the listing side is checked on the resolver every listed key goes through.)"""
    with pytest.raises(StorageError, match="refusing key") as err:
        storage._local_path(tmp_path / "m", key, "s3://bucket/m")
    assert repr(key) in str(err.value) and "s3://bucket/m" in str(err.value)
    assert storage._local_path(tmp_path / "m", "sub/x.bin", "s3://b/m") == tmp_path / "m/sub/x.bin"


def test_manifest_paths_that_would_escape_the_cache_are_refused(s3_server, s3_bucket, tmp_path):
    """A manifest on the server naming `../../escape.bin`: refused, naming the path, before
    anything is written."""
    remote = open_storage(f"s3://{s3_bucket}/m", s3_settings(s3_server))
    upload_stage(remote, write_tree(tmp_path / "src", {"config.json": b"{}"}), "", stage="s")
    doc = json.loads(remote.read_bytes(MANIFEST_NAME))
    doc["files"].append({"path": "../../escape.bin", "size": 4, "sha256": "0" * 64})
    remote.write_bytes(MANIFEST_NAME, json.dumps(doc).encode())
    target = tmp_path / "cache" / "downloads" / "m"
    with pytest.raises(StorageError, match="'../../escape.bin'"):
        fetch_folder(remote, target)
    assert not target.exists() and not target.with_name("m.fetching").exists()
    assert not any(p.name == "escape.bin" for p in tmp_path.rglob("*"))


def test_folder_placeholders_are_skipped(s3_server, s3_bucket, tmp_path):
    """A zero-byte `sub/` object (an S3 console's "create folder") is not a file to fetch."""
    client = s3_server.client()
    client.put_object(Bucket=s3_bucket, Key="m/sub/", Body=b"")
    client.put_object(Bucket=s3_bucket, Key="m/sub/config.json", Body=b"{}")
    remote = open_storage(f"s3://{s3_bucket}/m", s3_settings(s3_server))
    assert "sub/" in {o.key for o in remote.list()}
    target = fetch_folder(remote, tmp_path / "m")
    assert (target / "sub" / "config.json").read_bytes() == b"{}"


def test_scratch_folders_of_killed_processes_are_removed(tmp_path, monkeypatch):
    """A killed training process leaves its scratch folder (no cleanup runs); the next one
    removes the folders of processes that are gone, and only those."""
    monkeypatch.setenv("SAMI_CACHE_DIR", str(tmp_path))
    gone = multiprocessing.Process(target=time.sleep, args=(0,))
    gone.start()
    gone.join()
    here = tmp_path / "scratch" / socket.gethostname()
    dead = here / f"sami-train-{gone.pid}-abc"
    live = here / f"sami-train-{os.getppid()}-def"  # pytest's parent: alive
    unnamed = here / "sami-train-xyz"  # no process id: not ours to judge
    # Another pod's, on a shared cache volume: its process ids are not this host's.
    elsewhere = tmp_path / "scratch" / "another-pod" / f"sami-train-{gone.pid}-ghi"
    for folder in (dead, live, unnamed, elsewhere):
        (folder / "export").mkdir(parents=True)
        (folder / "export" / "model.safetensors").write_bytes(b"x" * 1000)
    with scratch_dir("train") as scratch:
        assert Path(scratch).name.startswith(f"sami-train-{os.getpid()}-")
        assert not dead.exists() and live.exists() and unnamed.exists()
        assert elsewhere.exists()
    assert not Path(scratch).exists()
