"""Run storage: one interface over `s3://bucket/prefix` and a local directory, plus stage manifests.

Everything a run produces lives under one prefix (docs/architecture.md, 'Storage'). Worker
programs and the local runner use the same few verbs on either backend, and the stage-manifest
protocol makes outputs trustworthy:

    upload the files -> write <prefix>/_manifest.json LAST -> readers look only at manifests

A crashed or half-finished writer leaves no manifest, so readers never see its files; the sizes
and sha256 digests in the manifest catch corruption on download.

Errors. `StorageError` is permanent (bad credentials, missing bucket or key, missing local path)
and fails fast. Transient faults (throttling, 5xx, refused or reset connections, timeouts) are
retried twice over: botocore's "standard" mode retries each request, and an outer loop here
retries each whole operation, so a multipart upload restarts and a download resumes from its
`.part` file (or, for a large file fetched in byte ranges, from the ranges it already has).
Credentials come only from boto3's default chain (environment, mounted files, the pod's IAM
role); they are never passed around, logged or put in messages.

Folders (models, checkpoints) are fetched once per node: `fetch_folder` downloads under a lock
file into a temporary sibling folder and renames it into place, so the several ranks of a pod,
and pods or stages sharing one cache volume, never write the same files at once.

Try it without S3:

    python -c "from sami_worker.storage import *; s = open_storage('/tmp/sami-demo'); \
      write_stage_files(s, 'principles', {'p.json': b'[]'}, stage='principles'); \
      print(is_complete(s, 'principles'), s.list())"
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import json
import logging
import os
import random
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, Protocol, TypeVar
from urllib.parse import unquote, urlparse

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

log = logging.getLogger(__name__)

MANIFEST_NAME = "_manifest.json"
MANIFEST_VERSION = 1
MiB = 1024 * 1024
_CHUNK = MiB  # streaming unit for hashing, copies and downloads: memory stays bounded
_TMP_SUFFIX = ".sami-tmp"  # local atomic-write temp files; list() hides them
FETCHED_MARKER = ".sami-fetched.json"  # written into a fetched folder before it is renamed in
_LOCK_POLL_S = 0.2  # how often a waiting process retries the lock: small against any download
_WAIT_LOG_EVERY_S = 30.0
T = TypeVar("T")

# S3 error codes by what the caller can do about them.
_NOT_FOUND_CODES = {"NoSuchKey", "404", "NotFound"}  # HEAD answers a bare 404
_AUTH_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"}
_THROTTLE_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded"}
# PreconditionFailed: the object changed between a download's HEAD and its ranged GET; the next
# attempt sees the new ETag and starts over.
_TRANSIENT_CODES = {"RequestTimeout", "InternalError", "ServiceUnavailable", "PreconditionFailed"}


class StorageError(Exception):
    """A storage failure the caller cannot retry away; the message names the bucket and key."""


class KeyNotFound(StorageError):
    """The key (or local file) does not exist."""


class StageIncomplete(StorageError):
    """The stage has no manifest: it has not finished publishing (or never ran)."""


class TransientStorageError(StorageError):
    """Transient faults (throttling, 5xx, network) outlasted the retry budget."""


class StorageSettings(BaseModel):
    """How to reach S3. Credentials are deliberately absent: boto3's default chain finds them.

    A transient fault is retried by botocore within one request (request_attempts, fast) and
    then by the outer loop around the whole operation (max_attempts, exponential backoff from
    backoff_base_s capped at backoff_cap_s, with jitter, none started after retry_deadline_s).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    endpoint_url: str | None = Field(None, description="Non-AWS S3 endpoint; None: AWS.")
    region: str | None = Field(None, description="Region; None lets boto3 resolve it.")
    force_path_style: bool = Field(False, description="endpoint/bucket/key addressing.")
    max_attempts: int = Field(8, ge=1, description="Attempts per whole operation (ours).")
    request_attempts: int = Field(3, ge=1, description="Attempts per request (botocore's).")
    backoff_base_s: float = Field(0.5, gt=0, description="First retry waits about this long.")
    backoff_cap_s: float = Field(10.0, gt=0, description="Longest wait between retries.")
    retry_deadline_s: float = Field(300.0, gt=0, description="No retry starts after this.")
    connect_timeout_s: float = Field(10.0, gt=0, description="TCP connect timeout per request.")
    read_timeout_s: float = Field(60.0, gt=0, description="Socket read timeout per request.")
    # S3 requires parts of at least 5 MiB; memory in flight is about max_concurrency parts.
    multipart_threshold: int = Field(64 * MiB, ge=5 * MiB, description="Upload in parts above.")
    multipart_chunksize: int = Field(64 * MiB, ge=5 * MiB, description="Part size.")
    max_concurrency: int = Field(4, ge=1, description="Parts uploaded at once.")
    # One GET stream is bounded by what a single connection carries (on S3 typically 50-100
    # MB/s), far below a node's network, so large files are fetched as byte ranges on several
    # connections. 8 is where S3's own guidance and s3transfer's default (10) put the knee: a
    # 10 Gbit/s node is nearly full, memory in flight stays at 8 x 1 MiB, and the request rate
    # is far below S3's per-prefix limit. More mostly adds contention on small nodes.
    download_threshold: int = Field(
        64 * MiB, ge=MiB, description="Files above this size are fetched in byte ranges."
    )
    download_part_size: int = Field(16 * MiB, ge=MiB, description="Bytes per ranged GET.")
    download_concurrency: int = Field(
        8, ge=1, description="GETs in flight at once: ranges of a large file, or small files."
    )


@dataclass(frozen=True)
class ObjectInfo:
    key: str  # relative to the storage root that listed it
    size: int


class Storage(Protocol):
    """What both backends offer. Keys are relative, '/'-separated; a prefix names a folder."""

    def uri(self, key: str = "") -> str: ...
    def child(self, prefix: str) -> Storage: ...
    def exists(self, key: str) -> bool: ...
    def read_bytes(self, key: str) -> bytes: ...
    def read_range(self, key: str, start: int, length: int) -> bytes: ...
    def write_bytes(self, key: str, data: bytes) -> None: ...
    def upload_file(self, local_path: str | os.PathLike[str], key: str) -> None: ...
    def download_file(self, key: str, local_path: str | os.PathLike[str]) -> None: ...
    def list(self, prefix: str = "") -> list[ObjectInfo]: ...
    def delete(self, key: str) -> None: ...
    def delete_prefix(self, prefix: str) -> None: ...


def open_storage(uri: str, settings: StorageSettings | None = None) -> Storage:
    """Storage rooted at `s3://bucket/prefix`, `file:///abs/path` or a plain local path."""
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise StorageError(f"storage URI {uri!r} names no bucket; expected s3://bucket/prefix")
        return S3Storage(parsed.netloc, parsed.path, settings or StorageSettings())
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise StorageError(f"storage URI {uri!r}: file URIs must be file:///absolute/path")
        return LocalStorage(Path(unquote(parsed.path)))
    if "://" in uri:
        raise StorageError(
            f"unsupported storage URI {uri!r}; expected s3://bucket/prefix, "
            "file:///absolute/path or a local path"
        )
    return LocalStorage(Path(uri).expanduser())


def _bad_key(key: str) -> bool:
    return any(part in ("", ".", "..") for part in key.split("/"))


def _local_path(root: Path, key: str, where: str) -> Path:
    """root/<key> for a key listed under `where`, refusing keys that would land outside root:
    S3 accepts any string as a key, so `m//etc/x` lists under `m/` as `/etc/x`."""
    if _bad_key(key) or "\0" in key:
        raise StorageError(
            f"refusing key {key!r} under {where}: it would be written outside {root}; keys must "
            "be relative '/'-separated paths without empty, '.' or '..' segments"
        )
    return root.joinpath(*key.split("/"))


# Body bytes and GET requests this process received from S3: lets a caller (the tests, the
# benchmark) see how much a fetch really transferred, e.g. that one download served a node.
_counts_lock = threading.Lock()
_counts = {"get_requests": 0, "get_bytes": 0}


def download_counts() -> dict[str, int]:
    """GetObject requests made and body bytes received by this process so far."""
    with _counts_lock:
        return dict(_counts)


def _count_get(nbytes: int) -> None:
    with _counts_lock:
        _counts["get_requests"] += 1
        _counts["get_bytes"] += nbytes


def _run_all(tasks: list[Callable[[], object]], workers: int) -> None:
    """Run tasks on up to `workers` threads. On the first failure, those not started are
    cancelled, the running ones finish, and that failure is raised."""
    if workers <= 1 or len(tasks) <= 1:
        for task in tasks:
            task()
        return
    pool = ThreadPoolExecutor(min(workers, len(tasks)), thread_name_prefix="sami-download")
    try:
        futures = [pool.submit(task) for task in tasks]
        wait(futures, return_when=FIRST_EXCEPTION)
        for future in futures:
            if future.done() and not future.cancelled() and future.exception() is not None:
                raise future.exception()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _join(*parts: str) -> str:
    """Join key parts into a normalized key; '..' would let a key escape its root."""
    key = "/".join(p.strip("/") for p in parts if p.strip("/"))
    if key and _bad_key(key):
        raise StorageError(f"invalid key {key!r}: empty, '.' and '..' segments are not allowed")
    return key


# ---------------------------------------------------------------------------------------------
# Local directory


class LocalStorage:
    """A directory laid out exactly like the S3 prefix; every write is atomic."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root).absolute()

    def _path(self, key: str) -> Path:
        key = _join(key)
        return self.root / key if key else self.root

    def uri(self, key: str = "") -> str:
        return self._path(key).as_uri()

    def child(self, prefix: str) -> LocalStorage:
        return LocalStorage(self._path(prefix))

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def read_bytes(self, key: str) -> bytes:
        with self._open(key) as f:
            return f.read()

    def read_range(self, key: str, start: int, length: int) -> bytes:
        with self._open(key) as f:
            f.seek(start)
            return f.read(length)

    def write_bytes(self, key: str, data: bytes) -> None:
        _atomic_write(self._path(key), lambda f: f.write(data))

    def upload_file(self, local_path: str | os.PathLike[str], key: str) -> None:
        with _open_local(Path(local_path)) as src:
            _atomic_write(self._path(key), lambda f: shutil.copyfileobj(src, f, _CHUNK))

    def download_file(self, key: str, local_path: str | os.PathLike[str]) -> None:
        with self._open(key) as src:
            _atomic_write(Path(local_path), lambda f: shutil.copyfileobj(src, f, _CHUNK))

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        found = []
        for dirpath, _, names in os.walk(self._path(prefix)):
            for name in names:
                if not (name.startswith(".") and name.endswith(_TMP_SUFFIX)):
                    path = Path(dirpath, name)
                    key = path.relative_to(self.root).as_posix()
                    found.append(ObjectInfo(key, path.stat().st_size))
        return sorted(found, key=lambda o: o.key)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> None:
        path = self._path(prefix)
        if path.is_dir():
            shutil.rmtree(path)

    def _open(self, key: str) -> IO[bytes]:
        return _open_local(self._path(key))


def _open_local(path: Path) -> IO[bytes]:
    try:
        return path.open("rb")
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
        raise KeyNotFound(f"no such file: {path}") from exc
    except OSError as exc:
        raise StorageError(f"cannot read {path}: {exc.strerror}") from exc


def _atomic_write(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Temp file in the same directory, fsync, os.replace: readers see the old file or the new
    one, never a torn one (a rename is atomic only within one filesystem)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=_TMP_SUFFIX)
    except OSError as exc:
        raise StorageError(f"cannot write {path}: {exc.strerror}") from exc
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise StorageError(f"cannot write {path}: {exc.strerror}") from exc
        raise
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    """A rename is durable only once the directory entry is flushed."""
    dir_fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# ---------------------------------------------------------------------------------------------
# S3


class S3Storage:
    """`s3://bucket/prefix` through boto3. The client is made on first use (computing URIs needs
    no boto3 and no credentials) and shared with children: boto3 clients are thread-safe."""

    def __init__(self, bucket: str, prefix: str, settings: StorageSettings, root: Any = None):
        self.bucket = bucket
        self.prefix = _join(prefix)
        self.settings = settings
        self._root: S3Storage = root or self

    @functools.cached_property
    def _own_client(self) -> Any:
        return _make_client(self.settings)

    @property
    def client(self) -> Any:
        return self._root._own_client

    def _key(self, key: str) -> str:
        return _join(self.prefix, key)

    def uri(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def child(self, prefix: str) -> S3Storage:
        return S3Storage(self.bucket, self._key(prefix), self.settings, self._root)

    def exists(self, key: str) -> bool:
        try:
            self._call("HEAD", key, lambda: self.client.head_object(**self._loc(key)))
        except KeyNotFound:
            return False
        return True

    def read_bytes(self, key: str) -> bytes:
        def get() -> bytes:
            data = self.client.get_object(**self._loc(key))["Body"].read()
            _count_get(len(data))
            return data

        return self._call("GET", key, get)

    def read_range(self, key: str, start: int, length: int) -> bytes:
        """`length` bytes from `start` (a ranged GET): a few items of a large file."""

        def get() -> bytes:
            got = self.client.get_object(
                **self._loc(key), Range=f"bytes={start}-{start + length - 1}"
            )
            data = got["Body"].read()
            _count_get(len(data))
            return data

        return self._call("GET", key, get)

    def write_bytes(self, key: str, data: bytes) -> None:
        self._call("PUT", key, lambda: self.client.put_object(**self._loc(key), Body=data))

    def upload_file(self, local_path: str | os.PathLike[str], key: str) -> None:
        from boto3.s3.transfer import TransferConfig

        s = self.settings
        config = TransferConfig(
            multipart_threshold=s.multipart_threshold,
            multipart_chunksize=s.multipart_chunksize,
            max_concurrency=s.max_concurrency,
        )
        # A failed attempt aborts its multipart upload (s3transfer does); the next one restarts.
        self._call(
            "upload",
            key,
            lambda: self.client.upload_file(
                os.fspath(local_path), self.bucket, self._key(key), Config=config
            ),
        )

    def download_file(self, key: str, local_path: str | os.PathLike[str]) -> None:
        """Fetch one object to local_path, which appears complete or not at all.

        Up to settings.download_threshold bytes: one stream into `<local>.part`; a later
        attempt (or a later call) resumes with a Range request when `<local>.part.etag` shows
        the object is unchanged. Larger: byte ranges of download_part_size on
        download_concurrency connections into a preallocated temp file; a retried attempt
        fetches only the ranges still missing, unless the object changed (its ETag)."""
        dest = Path(local_path)
        ranges = _Ranges()

        def attempt() -> None:
            head = self.client.head_object(**self._loc(key))
            size, etag = head["ContentLength"], head["ETag"]
            if size > self.settings.download_threshold:
                self._fetch_ranges(key, dest, size, etag, ranges)
            else:
                self._fetch_stream(key, dest, size, etag)

        try:
            self._call("download", key, attempt)
        finally:
            ranges.discard()

    def _fetch_stream(self, key: str, dest: Path, size: int, etag: str) -> None:
        part = dest.with_name(dest.name + ".part")
        etag_file = dest.with_name(dest.name + ".part.etag")
        offset = part.stat().st_size if part.is_file() else 0
        if not (etag_file.is_file() and etag_file.read_text() == etag and offset <= size):
            dest.parent.mkdir(parents=True, exist_ok=True)
            part.write_bytes(b"")
            etag_file.write_text(etag)
            offset = 0
        elif offset:
            log.info("resuming download of %s at byte %d of %d", self.uri(key), offset, size)
        if offset < size:
            got = self.client.get_object(**self._loc(key), Range=f"bytes={offset}-", IfMatch=etag)
            # Append chunk by chunk: what arrived before a dropped connection stays in .part.
            with part.open("ab") as f:
                _drain(got["Body"], f.write)
                f.flush()
                os.fsync(f.fileno())
        if (have := part.stat().st_size) != size:
            raise TransientStorageError(f"download {self.uri(key)}: {have} of {size} bytes")
        os.replace(part, dest)
        etag_file.unlink()

    def _fetch_ranges(self, key: str, dest: Path, size: int, etag: str, ranges: _Ranges) -> None:
        step, workers = self.settings.download_part_size, self.settings.download_concurrency
        if ranges.etag != etag:  # the first attempt, or the object changed since: start over
            ranges.start(dest, size, etag)
            log.info(
                "downloading %s (%d MiB) in %d ranges on %d connections",
                self.uri(key), size // MiB, -(-size // step), workers,
            )  # fmt: skip
        assert ranges.path is not None
        fd = os.open(ranges.path, os.O_WRONLY)

        def fetch(start: int) -> None:
            end = min(start + step, size) - 1
            got = self.client.get_object(
                **self._loc(key), Range=f"bytes={start}-{end}", IfMatch=etag
            )
            offset = start

            def write(chunk: bytes) -> None:
                nonlocal offset
                view = memoryview(chunk)
                while view:  # pwrite may write less than asked
                    written = os.pwrite(fd, view, offset)
                    view, offset = view[written:], offset + written

            _drain(got["Body"], write)
            if offset != end + 1:
                raise TransientStorageError(
                    f"download {self.uri(key)}: bytes {start}-{end} ended at {offset}"
                )
            ranges.done.add(start)  # set.add is atomic under the GIL

        try:
            todo = [s for s in range(0, size, step) if s not in ranges.done]
            _run_all([functools.partial(fetch, s) for s in todo], workers)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(ranges.path, dest)
        ranges.path = None

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        folder = self._key(prefix)
        skip = len(self.prefix) + 1 if self.prefix else 0

        def scan() -> list[ObjectInfo]:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=folder + "/" if folder else ""
            )
            return [
                ObjectInfo(o["Key"][skip:], o["Size"]) for p in pages for o in p.get("Contents", [])
            ]

        return self._call("list", prefix, scan)

    def delete(self, key: str) -> None:
        self._call("DELETE", key, lambda: self.client.delete_object(**self._loc(key)))

    def delete_prefix(self, prefix: str) -> None:
        keys = [o.key for o in self.list(prefix)]
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = {"Objects": [{"Key": self._key(k)} for k in keys[start : start + 1000]]}
            result = self._call(
                "delete",
                prefix,
                lambda batch=batch: self.client.delete_objects(Bucket=self.bucket, Delete=batch),
            )
            if errors := result.get("Errors"):
                first = errors[0]
                raise StorageError(
                    f"delete s3://{self.bucket}/{first.get('Key')}: {first.get('Code')} "
                    f"({len(errors)} keys under {self.uri(prefix)} not deleted)"
                )

    def _loc(self, key: str) -> dict[str, str]:
        return {"Bucket": self.bucket, "Key": self._key(key)}

    def _call(self, op: str, key: str, fn: Callable[[], T]) -> T:
        """Run one whole operation, retrying transient failures with capped exponential backoff
        and jitter, bounded by settings.max_attempts and settings.retry_deadline_s."""
        s = self.settings
        start = time.monotonic()
        for attempt in range(1, s.max_attempts + 1):
            try:
                return fn()
            except Exception as exc:
                error = _translate(exc, op, self.uri(key), self.bucket)
                if error is None:
                    raise
                if not isinstance(error, TransientStorageError):
                    raise error from exc
                delay = min(s.backoff_cap_s, s.backoff_base_s * 2 ** (attempt - 1))
                delay *= random.uniform(0.5, 1.0)  # jitter: many workers must not retry in step
                elapsed = time.monotonic() - start
                if attempt == s.max_attempts or elapsed + delay > s.retry_deadline_s:
                    raise TransientStorageError(
                        f"{error} (gave up after {attempt} attempts in {elapsed:.1f} s)"
                    ) from exc
                log.warning(
                    "%s; retry %d of %d in %.1f s", error, attempt, s.max_attempts - 1, delay
                )
                time.sleep(delay)
        raise AssertionError("unreachable")


def _make_client(settings: StorageSettings) -> Any:
    try:
        import boto3
        from botocore.config import Config
    except ImportError as exc:
        raise StorageError("s3:// storage needs boto3: pip install boto3") from exc
    config = Config(
        region_name=settings.region,
        retries={"mode": "standard", "max_attempts": settings.request_attempts},
        connect_timeout=settings.connect_timeout_s,
        read_timeout=settings.read_timeout_s,
        s3={"addressing_style": "path" if settings.force_path_style else "auto"},
        max_pool_connections=max(10, 2 * settings.max_concurrency, settings.download_concurrency),
    )
    # A Session of our own: boto3's module-level default session is not thread-safe.
    return boto3.session.Session().client("s3", endpoint_url=settings.endpoint_url, config=config)


def _drain(body: Any, write: Callable[[bytes], object]) -> None:
    """Copy a GetObject body to `write` in bounded chunks, counting what arrived."""
    received = 0
    try:
        for chunk in body.iter_chunks(_CHUNK):
            write(chunk)
            received += len(chunk)
    finally:
        _count_get(received)


@dataclass
class _Ranges:
    """A ranged download's temp file and the ranges in it, kept across retried attempts."""

    path: Path | None = None
    etag: str | None = None
    done: set[int] = field(default_factory=set)

    def start(self, dest: Path, size: int, etag: str) -> None:
        self.discard()
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=_TMP_SUFFIX)
        self.path, self.etag, self.done = Path(tmp), etag, set()
        try:
            os.posix_fallocate(fd, 0, size)  # a full disk fails now, not gigabytes later
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            os.ftruncate(fd, size)  # filesystems without fallocate: a sparse file
        finally:
            os.close(fd)

    def discard(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)
        self.path, self.etag = None, None


def _translate(exc: BaseException, op: str, uri: str, bucket: str) -> StorageError | None:
    """Map an exception to KeyNotFound / StorageError / TransientStorageError, or None for one
    that is not a storage failure (a bug), which the caller re-raises untouched. Messages carry
    the S3 error code, never the server's free text for auth failures: only codes are safe."""
    from botocore import exceptions as bce

    if isinstance(exc, StorageError):
        return exc
    cause: BaseException | None = exc
    # boto3 wraps upload ClientErrors in S3UploadFailedError, keeping the original as context.
    while cause is not None and not isinstance(
        cause, (bce.ClientError, bce.BotoCoreError, OSError)
    ):
        cause = cause.__cause__ or cause.__context__
    where = f"{op} {uri}"
    if isinstance(cause, bce.ClientError):
        code = str(cause.response.get("Error", {}).get("Code", "Unknown"))
        status = cause.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if code in _NOT_FOUND_CODES:
            return KeyNotFound(f"{where}: {code}: no such key")
        if code in _THROTTLE_CODES or code in _TRANSIENT_CODES or status >= 500:
            return TransientStorageError(f"{where}: transient error {code} (HTTP {status})")
        if code in _AUTH_CODES or status == 403:
            return StorageError(
                f"{where}: {code} (HTTP {status}): access denied; check the credentials boto3 "
                "finds (AWS_* environment, AWS_PROFILE, mounted credentials file or the pod's "
                f"IAM role) and the policy of bucket {bucket!r}"
            )
        if code == "NoSuchBucket":
            return StorageError(f"{where}: NoSuchBucket: bucket {bucket!r} does not exist")
        message = str(cause.response.get("Error", {}).get("Message", ""))[:200]
        return StorageError(f"{where}: {code} (HTTP {status}): {message}")
    if isinstance(cause, (bce.NoCredentialsError, bce.PartialCredentialsError)):
        return StorageError(f"{where}: no AWS credentials found by boto3's default chain")
    transient = (bce.ConnectionError, bce.HTTPClientError, bce.IncompleteReadError)
    if isinstance(cause, (*transient, ConnectionError, TimeoutError)):
        return TransientStorageError(f"{where}: transient error {type(cause).__name__}: {cause}")
    if isinstance(cause, (bce.BotoCoreError, OSError)):
        return StorageError(f"{where}: {type(cause).__name__}: {cause}")
    return None


# ---------------------------------------------------------------------------------------------
# Stage manifests


class ManifestFile(BaseModel):
    path: str = Field(description="Key relative to the stage prefix, '/'-separated.")
    size: int = Field(ge=0, description="Size in bytes.")
    sha256: str = Field(pattern="^[0-9a-f]{64}$", description="Hex sha256 of the contents.")

    @field_validator("path")
    @classmethod
    def _relative(cls, path: str) -> str:
        if _bad_key(path) or path == MANIFEST_NAME:
            raise ValueError(
                f"{path!r} must be a relative '/'-separated path without empty, '.' or '..' "
                f"segments, and not {MANIFEST_NAME!r}"
            )
        return path


class Manifest(BaseModel):
    """`<prefix>/_manifest.json`: the stage is complete exactly when this exists."""

    version: int = Field(MANIFEST_VERSION, description="Manifest format version.")
    stage: str = Field(description="Which stage wrote it, e.g. 'generate_2'.")
    created: datetime = Field(description="When it was published (RFC 3339, UTC).")
    files: list[ManifestFile] = Field(description="Every output file of the stage.")
    meta: dict[str, Any] = Field(default_factory=dict, description="The stage's own summary.")


def _file_digest(path: Path) -> tuple[int, str]:
    """(size, sha256 hex), streamed so memory stays bounded for checkpoint shards."""
    digest, size = hashlib.sha256(), 0
    with _open_local(path) as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def upload_stage(
    storage: Storage,
    local_dir: str | os.PathLike[str],
    prefix: str,
    *,
    stage: str,
    meta: dict[str, Any] | None = None,
) -> Manifest:
    """Publish every file under local_dir to prefix/, then the manifest, last."""
    root = Path(local_dir)
    if not root.is_dir():
        raise StorageError(f"upload_stage: {root} is not a directory")
    unpublish(storage, prefix)
    paths = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    files = upload_files(storage, prefix, root, paths)
    return publish_manifest(storage, prefix, files, stage=stage, meta=meta)


def upload_files(
    storage: Storage, prefix: str, local_root: str | os.PathLike[str], paths: list[str]
) -> list[ManifestFile]:
    """Upload local_root/<path> to prefix/<path> for each path and return their manifest
    entries, without publishing. For stages written by several processes (sharded
    checkpoints): each uploads its own files, one publishes the manifest of all."""
    if MANIFEST_NAME in paths:
        raise StorageError(f"{MANIFEST_NAME}: that name is reserved for the stage manifest")
    target = storage.child(prefix)
    files = []
    for rel in paths:
        path = Path(local_root, *rel.split("/"))
        size, sha256 = _file_digest(path)
        target.upload_file(path, rel)
        files.append(ManifestFile(path=rel, size=size, sha256=sha256))
    return files


def write_stage_files(
    storage: Storage,
    prefix: str,
    files: dict[str, bytes],
    *,
    stage: str,
    meta: dict[str, Any] | None = None,
) -> Manifest:
    """Publish small in-memory outputs (name -> bytes) to prefix/, then the manifest, last."""
    entries = [
        ManifestFile(path=name, size=len(data), sha256=hashlib.sha256(data).hexdigest())
        for name, data in sorted(files.items())
    ]
    unpublish(storage, prefix)
    target = storage.child(prefix)
    for entry in entries:
        target.write_bytes(entry.path, files[entry.path])
    return publish_manifest(storage, prefix, entries, stage=stage, meta=meta)


def unpublish(storage: Storage, prefix: str) -> None:
    """Withdraw a stage's manifest before its files are overwritten: an old manifest would
    vouch for a mix of old and new files meanwhile."""
    storage.child(prefix).delete(MANIFEST_NAME)


def publish_manifest(
    storage: Storage,
    prefix: str,
    files: list[ManifestFile],
    *,
    stage: str,
    meta: dict[str, Any] | None = None,
) -> Manifest:
    """Write prefix/_manifest.json: from now on the stage is complete."""
    target = storage.child(prefix)
    manifest = Manifest(
        stage=stage, created=datetime.now(timezone.utc), files=files, meta=meta or {}
    )
    target.write_bytes(MANIFEST_NAME, manifest.model_dump_json(indent=2).encode())
    total = sum(f.size for f in files)
    log.info("published %s: %d files, %d bytes", target.uri(MANIFEST_NAME), len(files), total)
    return manifest


def read_manifest(storage: Storage, prefix: str) -> Manifest | None:
    """The stage's manifest, or None when it has none; StorageError when it is unreadable."""
    target = storage.child(prefix)
    try:
        raw = target.read_bytes(MANIFEST_NAME)
    except KeyNotFound:
        return None
    try:
        manifest = Manifest.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"]) or "document"
        raise StorageError(
            f"{target.uri(MANIFEST_NAME)} is not a valid stage manifest: {where}: {first['msg']}"
        ) from exc
    if manifest.version > MANIFEST_VERSION:
        raise StorageError(
            f"{target.uri(MANIFEST_NAME)} has version {manifest.version}; this sami reads up to "
            f"{MANIFEST_VERSION}: upgrade sami"
        )
    return manifest


def _require_manifest(target: Storage) -> Manifest:
    manifest = read_manifest(target, "")
    if manifest is None:
        raise StageIncomplete(
            f"{target.uri(MANIFEST_NAME)} does not exist: the stage has not finished publishing"
        )
    return manifest


def complete_manifest(storage: Storage, prefix: str) -> Manifest | None:
    """The stage's manifest when the stage is complete (is_complete), else None; the manifest
    is read once."""
    manifest = read_manifest(storage, prefix)
    if manifest is None:
        return None
    sizes = {o.key: o.size for o in storage.child(prefix).list()}
    return manifest if all(sizes.get(f.path) == f.size for f in manifest.files) else None


def is_complete(storage: Storage, prefix: str) -> bool:
    """Manifest present and every listed file present with its listed size (no hashing)."""
    return complete_manifest(storage, prefix) is not None


def download_stage(
    storage: Storage,
    prefix: str,
    local_dir: str | os.PathLike[str],
    manifest: Manifest | None = None,
) -> Manifest:
    """Fetch every listed file into local_dir (resumably) and verify size and sha256; files
    already there with the right digest are kept. `manifest`: the stage's, if already read."""
    target = storage.child(prefix)
    manifest = manifest or _require_manifest(target)
    root = Path(local_dir)

    def fetch(entry: ManifestFile) -> None:
        dest = _local_path(root, entry.path, target.uri())
        want = (entry.size, entry.sha256)
        if dest.is_file() and dest.stat().st_size == entry.size and _file_digest(dest) == want:
            return
        download_listed_file(target, entry, root)

    _download_all(target, [(e.size, functools.partial(fetch, e)) for e in manifest.files])
    log.info("downloaded %s to %s (%d files)", target.uri(), local_dir, len(manifest.files))
    return manifest


def download_folder(storage: Storage, prefix: str, local_dir: str | os.PathLike[str]) -> list[str]:
    """Fetch every object under prefix/ into local_dir, for folders without a manifest (a
    model uploaded by hand); files already there with the listed size are kept. Returns the
    keys fetched or kept. Every key is checked before anything is written."""
    target = storage.child(prefix)
    root = Path(local_dir)
    # Zero-byte keys ending in '/' are the "folder" placeholders of S3 consoles, not files.
    listed = [o for o in target.list() if not (o.key.endswith("/") and o.size == 0)]
    if not listed:
        raise KeyNotFound(f"{target.uri()} holds no objects")
    planned = [(o, _local_path(root, o.key, target.uri())) for o in listed]

    def fetch(info: ObjectInfo, dest: Path) -> None:
        if not (dest.is_file() and dest.stat().st_size == info.size):
            target.download_file(info.key, dest)

    _download_all(target, [(o.size, functools.partial(fetch, o, d)) for o, d in planned])
    log.info("downloaded %s to %s (%d files)", target.uri(), local_dir, len(listed))
    return [o.key for o in listed]


def _download_all(storage: Storage, tasks: list[tuple[int, Callable[[], None]]]) -> None:
    """Run (size, download) tasks: files above the ranged threshold one after another (each
    already keeps download_concurrency ranges in flight), the smaller ones that many at a time,
    so that no more than download_concurrency GETs are open at once."""
    if not isinstance(storage, S3Storage):
        for _, task in tasks:  # a local copy gains nothing from threads
            task()
        return
    settings = storage.settings
    for _, task in (t for t in tasks if t[0] > settings.download_threshold):
        task()
    _run_all(
        [t for size, t in tasks if size <= settings.download_threshold],
        settings.download_concurrency,
    )


def fetch_folder(storage: Storage, local_dir: str | os.PathLike[str]) -> Path:
    """The folder at `storage` (its root) as local_dir, downloaded once per machine however
    many processes ask at once: the ranks of a pod, or pods and stages sharing a cache volume.

    A process that finds local_dir/.sami-fetched.json returns at once: a fetched folder is
    complete and never rewritten. Otherwise it takes `<local_dir>.lock` (flock; processes that
    find it taken wait, logging so) and downloads into `<local_dir>.fetching`, a folder with a
    sami manifest verified by sha256 (download_stage), any other listed and fetched
    (download_folder). The marker is written into it and it is renamed to local_dir, so
    local_dir appears complete or not at all. A holder that dies leaves `.fetching`, which the
    next holder resumes: files already complete are kept, temp files are dropped. flock works
    on local filesystems and NFSv4; lock files are left in place, since removing one would let
    two processes lock different files of the same name."""
    target = Path(local_dir)
    marker = target / FETCHED_MARKER
    if marker.is_file():
        return target
    with _exclusive(target.with_name(target.name + ".lock"), storage.uri()):
        if marker.is_file():
            log.info("%s was fetched by another process into %s", storage.uri(), target)
            return target
        fetching = target.with_name(target.name + ".fetching")
        if target.exists():  # an unmarked folder (written by an older sami): resume from it
            if fetching.exists():
                shutil.rmtree(target)
            else:
                os.rename(target, fetching)
        if fetching.exists():
            log.info("resuming the interrupted fetch of %s in %s", storage.uri(), fetching)
            for junk in fetching.rglob(f"*{_TMP_SUFFIX}"):  # ranged temp files do not resume
                junk.unlink()
        started = time.monotonic()
        if (manifest := read_manifest(storage, "")) is not None:
            keys = [f.path for f in download_stage(storage, "", fetching, manifest).files]
        else:
            keys = download_folder(storage, "", fetching)
        _prune(fetching, {*keys, FETCHED_MARKER})
        record = {
            "uri": storage.uri(),
            "files": len(keys),
            "bytes": sum(p.stat().st_size for p in fetching.rglob("*") if p.is_file()),
            "seconds": round(time.monotonic() - started, 3),
            "fetched": datetime.now(timezone.utc).isoformat(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
        }
        _atomic_write(fetching / FETCHED_MARKER, lambda f: f.write(json.dumps(record).encode()))
        os.rename(fetching, target)
        _fsync_dir(target.parent)
    log.info(
        "fetched %s into %s: %d files, %d bytes",
        storage.uri(),
        target,
        record["files"],
        record["bytes"],
    )
    return target


def _prune(root: Path, keep: set[str]) -> None:
    """Remove what a resumed fetch left behind that the folder does not hold (any longer):
    `.part` files, files deleted remotely since, then the emptied directories."""
    for path in sorted(root.rglob("*"), reverse=True):  # children before their directories
        if path.is_dir() and not path.is_symlink():
            with contextlib.suppress(OSError):
                path.rmdir()  # only when empty
        elif path.relative_to(root).as_posix() not in keep:
            path.unlink()


@contextlib.contextmanager
def _exclusive(lock_path: Path, what: str) -> Iterator[None]:
    """Hold an exclusive flock on lock_path; the kernel drops it when its holder dies."""
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise StorageError(f"cannot create lock file {lock_path}: {exc.strerror}") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _wait_for_lock(fd, lock_path, what)
        yield
    finally:
        os.close(fd)  # releases the lock


def _wait_for_lock(fd: int, lock_path: Path, what: str) -> None:
    log.info("another process is fetching %s; waiting for it (lock %s)", what, lock_path)
    started = last_log = time.monotonic()
    while True:
        time.sleep(_LOCK_POLL_S)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() - last_log >= _WAIT_LOG_EVERY_S:
                last_log = time.monotonic()
                log.info("still waiting for %s after %.0f s", what, last_log - started)
    log.info("waited %.1f s for the fetch of %s", time.monotonic() - started, what)


def read_stage_file(storage: Storage, prefix: str, path: str) -> bytes:
    """One listed file of a complete stage, verified against its manifest entry."""
    target = storage.child(prefix)
    manifest = _require_manifest(target)
    entry = next((f for f in manifest.files if f.path == path), None)
    if entry is None:
        raise KeyNotFound(f"{target.uri(path)} is not listed in {target.uri(MANIFEST_NAME)}")
    data = target.read_bytes(path)
    if len(data) != entry.size or hashlib.sha256(data).hexdigest() != entry.sha256:
        raise StorageError(f"{target.uri(path)} does not match its manifest (size or sha256)")
    return data


def download_listed_file(target: Storage, entry: ManifestFile, local_dir: str | os.PathLike[str]):
    """One file of a stage's manifest into local_dir, verified by size and sha256 (for a
    reader that needs only some files of a stage, such as one rank of a sharded state)."""
    dest = _local_path(Path(local_dir), entry.path, target.uri())
    target.download_file(entry.path, dest)
    if (got := _file_digest(dest)) != (entry.size, entry.sha256):
        dest.unlink()  # a corrupt copy must not pass for a good one on the next run
        raise StorageError(
            f"{target.uri(entry.path)} does not match its manifest: size {got[0]} "
            f"(listed {entry.size}), sha256 {got[1]} (listed {entry.sha256})"
        )
