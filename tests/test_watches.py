"""The operator's index of what its watches show (sami_operator.watches), fed the events its
informers deliver; the informers themselves run against the real API server in
tests/test_operator.py and tests/test_chart.py."""

from __future__ import annotations

import pytest
from kubernetes import client
from kubernetes.informer import ADDED, DELETED, MODIFIED

from sami_operator import watches
from sami_operator.launchers import JOB, PYTORCHJOB

MANAGED = {"app.kubernetes.io/managed-by": "sami-operator"}


def obj(name: str, run: str | None, namespace: str = "team-a", **labels: str) -> dict:
    tags = {**MANAGED, **labels} | ({"sami.dev/run": run} if run else {})
    return {"metadata": {"name": name, "namespace": namespace, "labels": tags, "uid": name}}


@pytest.fixture
def index():
    """A Watches with no informer started (no API server needed): what it notifies, recorded."""
    woken: list[tuple[str, str]] = []
    found = watches.Watches(client.ApiClient(), ["team-a"], lambda ns, run: woken.append((ns, run)))
    return found, woken


def test_children_and_their_pods_are_filed_under_their_run(index):
    w, woken = index
    w._on_child(PYTORCHJOB, obj("r-it1-train", "r"), ADDED)
    w._on_child(JOB, obj("other-it0-evaluate", "other"), ADDED)
    master = obj("r-it1-train-master-0", "r", **{"training.kubeflow.org/job-name": "r-it1-train"})
    stray = obj("r-it1-train-x", "r", **{"training.kubeflow.org/job-name": "r-it2-train"})
    w._on_pod(master, ADDED)
    w._on_pod(stray, ADDED)
    assert {n: wl for n, (wl, _) in w.children("team-a", "r").items()} == {
        "r-it1-train": PYTORCHJOB
    }
    assert [p["metadata"]["name"] for p in w.pods("team-a", "r", PYTORCHJOB, "r-it1-train")] == [
        "r-it1-train-master-0"
    ]
    assert woken == [("team-a", "r"), ("team-a", "other"), ("team-a", "r"), ("team-a", "r")]
    before = w.version("team-a", "r")
    w._on_pod(master, MODIFIED)
    assert w.version("team-a", "r") > before and w.version("team-a", "other") < before
    w._on_child(PYTORCHJOB, obj("r-it1-train", "r"), DELETED)
    assert w.children("team-a", "r") == {}
    w._on_child(JOB, obj("unlabelled", None), ADDED)  # no run: not ours to file
    assert w.version("team-a", "unlabelled") == 0


def test_a_created_child_counts_until_its_watch_shows_it(index, monkeypatch):
    w, _ = index
    clock = [100.0]
    monkeypatch.setattr(watches.time, "monotonic", lambda: clock[0])
    w.expect("team-a", "r", "r-it0-evaluate")
    assert w.children("team-a", "r") == {"r-it0-evaluate": (None, None)}
    # Another run, even one whose name the child's begins with, never sees it.
    w.expect("team-a", "r-it0", "r-it0-x-it0-evaluate")
    assert "r-it0-x-it0-evaluate" not in w.children("team-a", "r")
    assert w.children("team-a", "rr") == {}
    w._on_child(JOB, obj("r-it0-evaluate", "r"), ADDED)
    assert w.children("team-a", "r")["r-it0-evaluate"][0] is JOB
    w._on_child(JOB, obj("r-it0-evaluate", "r"), DELETED)
    assert w.children("team-a", "r") == {}  # seen, then gone: gone
    w.expect("team-a", "r", "r-it1-generate")
    clock[0] += watches.EXPECTATION_SECONDS + 1
    assert w.children("team-a", "r") == {}  # never shown: deleted in between


def test_failed_create_events_wake_every_run_of_their_namespace(index):
    w, woken = index
    w._on_child(JOB, obj("r-it0-evaluate", "r"), ADDED)
    w._on_child(JOB, obj("s-it0-evaluate", "s"), ADDED)
    woken.clear()
    event = {
        "metadata": {"name": "e1", "namespace": "team-a", "uid": "e1"},
        "reason": "FailedCreate",
        "involvedObject": {"kind": "Job", "name": "r-it0-evaluate"},
        "message": "pods forbidden: exceeded quota",
    }
    w._on_event(event, ADDED)
    assert sorted(woken) == [("team-a", "r"), ("team-a", "s")]
    assert w.failed_creates("team-a", "r-it0-evaluate") == [event]
    assert w.failed_creates("team-a", "s-it0-evaluate") == []
    w._on_event(event, DELETED)
    assert w.failed_creates("team-a", "r-it0-evaluate") == []
