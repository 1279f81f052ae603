"""scripts/venv.sh: clones share one heavy environment, and each imports its own code.

Two copies of this checkout are set up at once on the shared environment this one uses (its
dependency files are the same, so nothing is installed but the projects themselves); each
must import its own `sami_operator`, also through the commands in its .venv/bin, and keep
working when the other is gone.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _shared() -> Path:
    marker = ROOT / ".venv" / ".shared"
    if not marker.is_file():
        pytest.skip("this checkout's .venv was not made by scripts/venv.sh")
    return Path(marker.read_text().strip())


def _copy(dest: Path, name: str) -> Path:
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for rel in filter(None, files):
        source = ROOT / rel.decode()
        if source.is_file():
            target = dest / rel.decode()
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    init = dest / "operator" / "sami_operator" / "__init__.py"
    init.write_text(init.read_text() + f"CLONE = {name!r}\n")
    return dest


def _own_code(clone: Path) -> str:
    program = "import sami_operator as m; print(m.CLONE, m.__file__)"
    return subprocess.run(
        [clone / ".venv" / "bin" / "python", "-c", program],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


def test_two_clones_on_one_shared_environment_import_their_own_code(tmp_path: Path):
    shared = _shared()
    clones = [_copy(tmp_path / name, name) for name in ("a", "b")]
    env = {"SAMI_CACHE_DIR": str(shared.parent), "PATH": "/usr/bin:/bin", "HOME": str(Path.home())}
    setups = [
        subprocess.Popen(
            [clone / "scripts" / "venv.sh"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for clone in clones
    ]
    for setup in setups:  # both at once: each writes only its own layer
        out, _ = setup.communicate(timeout=600)
        assert setup.returncode == 0, out.decode()[-3000:]
    a, b = clones
    for clone in clones:
        assert (clone / ".venv" / ".shared").read_text().strip() == str(shared)
        assert _own_code(clone) == f"{clone.name} {clone}/operator/sami_operator/__init__.py"
        # The commands run this clone's python: torchrun's workers import this clone's code.
        for tool in ("sami", "torchrun", "pytest"):
            first = (clone / ".venv" / "bin" / tool).read_text().splitlines()[0]
            assert first == f"#!{clone}/.venv/bin/python", tool
    version = subprocess.run([a / ".venv" / "bin" / "sami", "version"], capture_output=True)
    assert version.returncode == 0, version.stderr
    # The shared environment holds the dependencies, never a clone's project.
    assert not (shared / "bin" / "sami").exists()
    shutil.rmtree(b)
    assert _own_code(a) == f"a {a}/operator/sami_operator/__init__.py"


def test_this_checkout_imports_its_own_code():
    import sami_operator

    assert Path(sami_operator.__file__).resolve().is_relative_to(ROOT)
