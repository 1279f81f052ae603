"""End to end: the quickstart's wall time, by stage.

    python -m benchmarks.run --only e2e [--quick]

Runs `sami run` (the command `make quickstart` runs) on examples/quickstart.yaml as a
subprocess, exactly as a user would, except that `spec.storage.uri` points into a fresh
temporary directory: the quickstart's usual output (runs/default/quickstart/<uid>) would make
every finished stage "already done" and nothing would be measured (the copy of the manifest
written there names the example data by absolute path). The stage times are not
re-timed from outside: they are the `startTime` and `completionTime` that the local runner
records for every stage in the run's `status.json` (the SAMIRun status shape; 1 s resolution).

Entries, one repetition (the full quickstart takes 13-20 minutes on the 2-core development
machine): each stage's duration against the wall time of the whole `sami run` (ratio = the
stage's share), and the wall time against the sum of the stages (ratio - 1 = what the runner
adds around the stages: startup, planning, status writes, the report). No targets: the issue
asks for the breakdown, not a bound.

--quick runs a reduced quickstart (one iteration, 8 training and 4 evaluation queries, 2
training steps, 32 new tokens): the same stages and programs in a few minutes instead of ~15;
its entries say "reduced".
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import yaml

from benchmarks.common import EXAMPLES, ROOT, entry

QUICKSTART = EXAMPLES / "quickstart.yaml"
STAGES = ("generate", "train", "evaluate")
STAGE_NOTE = (
    "this and the next stage entries: the stage's time from the run's status.json (1 s "
    "resolution); baseline: the wall time of the whole `sami run`; ratio = the stage's share"
)


def skipped_on_cpu() -> list[dict]:
    return []  # the quickstart is the CPU path; nothing is skipped without a GPU


def spec(quick: bool, storage: Path) -> dict:
    doc = yaml.safe_load(QUICKSTART.read_text())
    doc["spec"]["storage"]["uri"] = str(storage)
    for source in ("train", "eval"):  # relative to examples/, and the copy lives elsewhere
        data = doc["spec"]["data"][source]
        data["uri"] = str(EXAMPLES / data["uri"])
    if quick:
        s = doc["spec"]
        s["training"]["iterations"] = 1
        s["training"]["steps"] = 2
        s["data"]["train"]["count"] = 8
        s["data"]["eval"]["count"] = 4
        s["generation"]["maxNewTokens"] = 32
    return doc


def sami_command() -> list[str]:
    script = Path(sys.executable).with_name("sami")
    return [str(script)] if script.exists() else [sys.executable, "-m", "sami_operator.cli"]


def run(quick: bool, device: str) -> list[dict]:
    label = "quickstart (reduced)" if quick else "quickstart"
    with tempfile.TemporaryDirectory(prefix="sami-bench-e2e-") as tmp:
        tmp = Path(tmp)
        spec_file = tmp / "quickstart.yaml"
        spec_file.write_text(yaml.safe_dump(spec(quick, tmp / "runs"), sort_keys=False))
        command = [*sami_command(), "run", str(spec_file), "--workdir", str(tmp / "work")]
        wall = _run(command, timeout=1800 if quick else 3600)
        found = sorted((tmp / "runs").glob("*/*/*/status.json"))
        if not found:
            raise RuntimeError(f"no status.json under {tmp / 'runs'}")
        status = json.loads(found[0].read_text())
    stages = stage_seconds(status)
    total = sum(stages.values())
    by_kind = collections.Counter()
    for stage_id, seconds in stages.items():
        by_kind[stage_id.rsplit("-", 1)[0]] += seconds
    shares = ", ".join(f"{k} {v:.0f} s ({v / wall:.0%})" for k, v in by_kind.most_common())
    entries = [
        entry(
            f"e2e: {label}, {stage_id}",
            [wall],
            [seconds],
            "s",
            None,
            "" if n else STAGE_NOTE,
        )
        for n, (stage_id, seconds) in enumerate(stages.items())
    ]
    mi = status.get("latestMiLowerBound")
    entries.append(
        entry(
            f"e2e: {label}, wall time",
            [total],
            [wall],
            "s",
            None,
            f"`sami run` wall time against the sum of its {len(stages)} stages (ratio - 1 = the "
            f"runner's own time around them); by kind: {shares}; phase {status.get('phase')}, "
            f"final MI lower bound {mi if mi is None else round(mi, 4)} nats; one repetition"
            + (
                "; --quick: 1 iteration, 8/4 train/eval queries, 2 steps, 32 new tokens"
                if quick
                else ""
            ),
        )
    )
    return entries


def stage_seconds(status: dict) -> dict[str, float]:
    """{stage id: seconds} for every finished stage, in the order they ran."""
    found = []
    if status.get("principles"):
        found.append(("principles", status["principles"]))
    for iteration in status.get("iterations") or []:
        for name in STAGES:
            if iteration.get(name):
                found.append((f"{name}-{iteration['iteration']}", iteration[name]))
    timed = [
        (_time(s["startTime"]), stage_id, (_time(s["completionTime"]) - _time(s["startTime"])))
        for stage_id, s in found
        if s.get("startTime") and s.get("completionTime")
    ]
    return {stage_id: seconds for _, stage_id, seconds in sorted(timed)}


def _time(stamp: str) -> float:
    return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S%z").timestamp()


def _run(command: list[str], timeout: float) -> float:
    """Run `command` from the repository root, its output shown on stderr; the wall time."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    started = time.monotonic()
    proc = subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    tail: collections.deque[str] = collections.deque(maxlen=80)
    try:
        for line in proc.stdout:
            tail.append(line)
            print(f"  e2e | {line.rstrip()}", file=sys.stderr)
            if time.monotonic() - started > timeout:
                raise TimeoutError(f"{' '.join(command)} ran past {timeout} s")
        code = proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()
    wall = time.monotonic() - started
    if code != 0:
        raise RuntimeError(f"{' '.join(command)} exited {code}:\n{''.join(tail)[-3000:]}")
    return wall
