"""training.rendezvousSeconds is the window real torchrun processes give each other to meet:
two local "nodes" launched as a JobSet's pods would be (the builders' torchrun arguments, the
rendezvous in PET_* env, static rendezvous on node 0's TCPStore), the second one late."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sami_operator.builders import build_children
from sami_operator.planner import plan
from sami_operator.settings import OperatorSettings
from sami_operator.validate import parse_samirun
from tests.k8s.controlplane import free_port

TORCHRUN = Path(sys.executable).with_name("torchrun")
SCRIPT = 'import os; print("rank", os.environ["RANK"], "of", os.environ["WORLD_SIZE"])'


def _torchrun_args(samirun_doc, seconds: int) -> list[str]:
    """The torchrun options of a JobSet's pods with rendezvousSeconds `seconds` (the model's
    minimum of 60 bypassed, to keep the test short)."""
    samirun_doc["spec"]["training"].update(launcher="JobSet", nodes=2, procsPerNode=1)
    run = parse_samirun(samirun_doc)
    run.spec.training.rendezvous_seconds = seconds
    stage = next(s for s in plan(run, "uid") if s.name == "train")
    jobset = build_children(run, stage, "uid", OperatorSettings(worker_image="w"))[1]
    pod = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    command = pod["containers"][0]["command"]
    assert command[0] == "torchrun"
    return command[1 : command.index("-m")]


def _node(args: list[str], rank: int, port: int, tmp_path: Path) -> subprocess.Popen:
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    env = {
        **os.environ,
        "PET_NNODES": "2",
        "PET_NPROC_PER_NODE": "1",
        "PET_NODE_RANK": str(rank),
        "PET_MASTER_ADDR": "127.0.0.1",
        "PET_MASTER_PORT": str(port),
        "OMP_NUM_THREADS": "1",
    }
    return subprocess.Popen(
        [str(TORCHRUN), *args, str(script)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.mark.slow
@pytest.mark.skipif(shutil.which(str(TORCHRUN)) is None, reason="torchrun is not installed")
def test_a_late_node_joins_within_the_window_and_not_after(samirun_doc, tmp_path):
    late = 6  # seconds between the first node's start and node 0's (the TCPStore's host)
    wide, narrow = _torchrun_args(samirun_doc, 60), _torchrun_args(samirun_doc, 2)
    assert wide == ["--rdzv-conf=timeout=60"] and narrow == ["--rdzv-conf=timeout=2"]
    port_wide, port_narrow = free_port(), free_port()
    # Node 1 of each pair starts first and waits for node 0; node 0 comes `late` s later.
    waiting = _node(wide, 1, port_wide, tmp_path)
    alone = _node(narrow, 1, port_narrow, tmp_path)
    time.sleep(late)
    first = _node(wide, 0, port_wide, tmp_path)
    outputs = [p.communicate(timeout=120)[0] for p in (waiting, first, alone)]
    assert (waiting.returncode, first.returncode) == (0, 0), outputs[:2]
    assert "rank 1 of 2" in outputs[0] and "rank 0 of 2" in outputs[1]
    # With a 2 s window, node 1 gives up before node 0 would have come.
    assert alone.returncode != 0
    assert "timed out after 2000ms" in outputs[2], outputs[2][-2000:]
