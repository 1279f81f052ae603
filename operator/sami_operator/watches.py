"""What the API server shows of the operator's children, kept current by watches.

One `kubernetes.informer.SharedInformer` per kind and watched namespace (or one cluster-wide)
lists, then watches, the objects labelled `app.kubernetes.io/managed-by: sami-operator`: the
stage workloads (Jobs and each served training launcher's kind) and their pods; and the events
saying a workload controller could not create a pod (FailedCreate, FailedCreatePod). Each
object is filed under its run (the `sami.dev/run` label), so a reconcile pass reads its run's
children with no API call, and each run has a version that moves whenever anything of it
changes: a pass whose run and version are as the last pass saw them has nothing to learn.

Objects stay raw (the API server's JSON as dicts): no model deserialisation, and one shape for
Jobs, pods and custom resources alike.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from types import SimpleNamespace

from kubernetes import client
from kubernetes.informer import ADDED, DELETED, ERROR, MODIFIED, SharedInformer

from sami_operator.builders import MANAGED_BY
from sami_operator.launchers import JOB, Workload
from sami_operator.models import GROUP

SELECTOR = f"app.kubernetes.io/managed-by={MANAGED_BY}"
RUN_LABEL = f"{GROUP}/run"
# Events of a workload controller that could not create a pod (the Job and JobSet
# controllers': FailedCreate; Kubeflow's training operator: FailedCreatePod).
FAILED_CREATE = ("FailedCreate", "FailedCreatePod")
# After a failed list or a broken watch, the informer tries again at once; its ERROR handler
# (run on its thread) makes it wait this long first, so an API server that is down is not
# hammered.
RETRY_SECONDS = 1.0
# How long a child this operator created may take to show up in its watch before it counts
# as gone (deleted by someone else in between).
EXPECTATION_SECONDS = 60.0


# What a reconcile pass reads of each kind; the rest (pod specs, managedFields) is dropped as
# objects arrive, from the informers' caches too (they hold the same dicts), so 1,000 runs'
# children cost megabytes, not the hundreds a full copy would.
_KEPT_METADATA = ("name", "namespace", "uid", "labels", "creationTimestamp", "deletionTimestamp")
_KEPT_STATUS = {
    "workload": ("conditions",),
    "pod": ("phase", "reason", "conditions", "containerStatuses", "initContainerStatuses"),
}
_KEPT_EVENT = ("reason", "message", "involvedObject", "lastTimestamp", "eventTime", "type")


def _trim(obj: dict, kind: str) -> dict:
    """Keep, in place, what the operator reads of an object of `kind` (workload, pod, event)."""
    meta = obj.get("metadata") or {}
    kept: dict = {"metadata": {k: meta[k] for k in _KEPT_METADATA if k in meta}}
    if kind == "event":
        kept.update((k, obj[k]) for k in _KEPT_EVENT if k in obj)
    else:
        status = obj.get("status") or {}
        kept["status"] = {k: status[k] for k in _KEPT_STATUS[kind] if k in status}
        if kind == "workload":
            kept["kind"] = obj.get("kind")
            kept["spec"] = {"suspend": (obj.get("spec") or {}).get("suspend")}
    obj.clear()
    obj.update(kept)
    return obj


@dataclass
class _Run:
    """One run's children (name -> (workload, object)) and pods (name -> pod)."""

    children: dict[str, tuple[Workload, dict]] = field(default_factory=dict)
    pods: dict[str, dict] = field(default_factory=dict)
    version: int = 0


class Watches:
    """The informers and the by-run index they keep. Thread-safe: the informers' threads
    write, reconcile passes read."""

    def __init__(
        self,
        api: client.ApiClient,
        namespaces: Iterable[str] = (),
        notify: Callable[[str, str], None] | None = None,
    ):
        self.api = api
        self.notify = notify  # (namespace, run), after a change, on the informer's thread
        self.namespaces = tuple(namespaces) or (None,)  # None: every namespace
        self._lock = threading.Lock()
        self._runs: dict[tuple[str, str], _Run] = {}
        self._events: dict[str, dict[str, dict]] = {}  # namespace -> uid -> event
        # Per (namespace, run): children created, not yet seen -> when (time.monotonic()).
        self._expected: dict[tuple[str, str], dict[str, float]] = {}
        self._counter = itertools.count(1)
        self._informers: dict[tuple[str, str | None], SharedInformer] = {}
        self._listed: dict[tuple[str, str | None], threading.Event] = {}

    # --- starting ------------------------------------------------------------------------------

    def start(self, workloads: Iterable[Workload]) -> None:
        """Watch pods, failed-create events, Jobs and the given custom workloads (more may be
        added later: `watch_workloads`)."""
        core = client.CoreV1Api(self.api)
        for namespace in self.namespaces:
            if namespace is None:
                pods = core.list_pod_for_all_namespaces
                events = core.list_event_for_all_namespaces
            else:
                pods = partial(core.list_namespaced_pod, namespace)
                events = partial(core.list_namespaced_event, namespace)
            self._inform(("pods", namespace), pods, self._on_pod, label_selector=SELECTOR)
            for reason in FAILED_CREATE:
                key = (f"events/{reason}", namespace)
                self._inform(key, events, self._on_event, field_selector=f"reason={reason}")
        self.watch_workloads([JOB, *workloads])

    def watch_workloads(self, workloads: Iterable[Workload]) -> None:
        """Watch these workload kinds too (a launcher's API served since the start)."""
        for workload in workloads:
            for namespace in self.namespaces:
                if (workload.kind, namespace) in self._informers:
                    continue
                self._inform(
                    (workload.kind, namespace),
                    self._workload_call(workload, namespace),
                    lambda obj, event, w=workload: self._on_child(w, obj, event),
                    label_selector=SELECTOR,
                )

    def _workload_call(self, workload: Workload, namespace: str | None):
        if workload is JOB:
            batch = client.BatchV1Api(self.api)
            if namespace is None:
                return batch.list_job_for_all_namespaces
            return partial(batch.list_namespaced_job, namespace)
        custom = client.CustomObjectsApi(self.api)
        group, version, plural = workload.api
        if namespace is None:
            return partial(custom.list_cluster_custom_object, group, version, plural)
        return partial(custom.list_namespaced_custom_object, group, version, namespace, plural)

    def _inform(self, key, call, on_change, **selectors) -> None:
        """Start an informer over `call`, an API list call taking only keyword arguments (its
        namespace, if any, bound)."""
        listed = threading.Event()

        def list_or_watch(**kwargs):
            """The list as an object with `.items` and `.metadata.resource_version`, or with
            watch=True the stream kubernetes.watch.Watch reads. Watch decodes events as the
            type this docstring returns: `object` keeps them raw dicts.

            :return: object
            """
            if kwargs.get("watch"):
                listed.set()  # the informer watches once its first list is in its cache
                return call(**kwargs)
            found = json.loads(call(_preload_content=False, **kwargs).data)
            meta = SimpleNamespace(resource_version=found["metadata"]["resourceVersion"])
            return SimpleNamespace(items=found["items"], metadata=meta)

        informer = SharedInformer(list_or_watch, **selectors)
        for event in (ADDED, MODIFIED, DELETED):
            informer.add_event_handler(event, lambda obj, event=event: on_change(obj, event))
        informer.add_event_handler(ERROR, lambda _: time.sleep(RETRY_SECONDS))
        self._informers[key], self._listed[key] = informer, listed
        informer.start()

    def stop(self) -> None:
        """Ask every informer to stop, without waiting: each thread ends at its watch's next
        event or when its connection breaks."""
        for informer in self._informers.values():
            threading.Thread(target=informer.stop, daemon=True).start()

    def wait_listed(self, timeout: float) -> None:
        """Until every informer has its first list (the API server answering). Raises
        TimeoutError naming those that have not."""
        deadline = time.monotonic() + timeout
        for listed in self._listed.values():
            if not listed.wait(max(0.0, deadline - time.monotonic())):
                missing = [
                    f"{kind} in {ns or 'all namespaces'}"
                    for (kind, ns), flag in self._listed.items()
                    if not flag.is_set()
                ]
                raise TimeoutError(f"not listed within {timeout:g} s: {', '.join(missing)}")

    # --- what the informers see ----------------------------------------------------------------

    def _entry(self, obj: dict) -> tuple[tuple[str, str], _Run] | None:
        meta = obj.get("metadata") or {}
        run = (meta.get("labels") or {}).get(RUN_LABEL)
        if not run:
            return None
        key = (meta.get("namespace", ""), run)
        return key, self._runs.setdefault(key, _Run())

    def _on_child(self, workload: Workload, obj: dict, event: str) -> None:
        _trim(obj, "workload")
        with self._lock:
            found = self._entry(obj)
            if found is None:
                return
            (namespace, _), entry = found
            name = obj["metadata"]["name"]
            if event == DELETED:
                entry.children.pop(name, None)
            else:
                entry.children[name] = (workload, obj)
            self._expected.get(found[0], {}).pop(name, None)
            entry.version = next(self._counter)
        self._changed([found[0]])

    def _on_pod(self, pod: dict, event: str) -> None:
        _trim(pod, "pod")
        with self._lock:
            found = self._entry(pod)
            if found is None:
                return
            _, entry = found
            if event == DELETED:
                entry.pods.pop(pod["metadata"]["name"], None)
            else:
                entry.pods[pod["metadata"]["name"]] = pod
            entry.version = next(self._counter)
        self._changed([found[0]])

    def _on_event(self, event_obj: dict, event: str) -> None:
        """A failed-create event names no run: every run in its namespace looks again."""
        meta = _trim(event_obj, "event")["metadata"]
        namespace = meta.get("namespace", "")
        with self._lock:
            events = self._events.setdefault(namespace, {})
            if event == DELETED:
                events.pop(meta["uid"], None)
            else:
                events[meta["uid"]] = event_obj
            runs = [key for key in self._runs if key[0] == namespace]
            for key in runs:
                self._runs[key].version = next(self._counter)
        self._changed(runs)

    def _changed(self, runs: list[tuple[str, str]]) -> None:
        if self.notify is not None:
            for namespace, run in runs:
                self.notify(namespace, run)

    # --- reading --------------------------------------------------------------------------------

    def expect(self, namespace: str, run: str, name: str) -> None:
        """A child of `run` this operator just created: until its watch shows it (or
        EXPECTATION_SECONDS pass), `children` counts it as there, so a pass that runs before
        the watch event arrives does not take it for gone and create another."""
        with self._lock:
            entry = self._runs.get((namespace, run))
            if entry is None or name not in entry.children:
                self._expected.setdefault((namespace, run), {})[name] = time.monotonic()

    def children(self, namespace: str, run: str) -> dict[str, tuple[Workload | None, dict | None]]:
        """The run's workloads by name: (workload, object), or (None, None) for one created
        but not yet seen."""
        with self._lock:
            entry = self._runs.get((namespace, run))
            found: dict[str, tuple[Workload | None, dict | None]] = dict(
                entry.children if entry else {}
            )
            expected = self._expected.get((namespace, run), {})
            now = time.monotonic()
            for name, since in list(expected.items()):
                if now - since > EXPECTATION_SECONDS:
                    del expected[name]
                elif name not in found:
                    found[name] = (None, None)
            if not expected:
                self._expected.pop((namespace, run), None)
        return found

    def pods(self, namespace: str, run: str, workload: Workload, name: str) -> list[dict]:
        """The pods that speak for a workload (its launcher's pod selector), by name."""
        wanted = dict(
            term.split("=", 1) for term in workload.pod_selector.format(name=name).split(",")
        )
        with self._lock:
            entry = self._runs.get((namespace, run))
            pods = list(entry.pods.values()) if entry else []
        selected = [
            p
            for p in pods
            if all((p["metadata"].get("labels") or {}).get(k) == v for k, v in wanted.items())
        ]
        return sorted(selected, key=lambda p: p["metadata"]["name"])

    def failed_creates(self, namespace: str, name: str) -> list[dict]:
        """Failed-create events of a workload or of the objects it made (`<name>-...`)."""
        with self._lock:
            events = list(self._events.get(namespace, {}).values())
        return [
            e
            for e in events
            if (e.get("involvedObject") or {}).get("name") == name
            or (e.get("involvedObject") or {}).get("name", "").startswith(f"{name}-")
        ]

    def version(self, namespace: str, run: str) -> int:
        """Moves whenever a child, pod or failed-create event of the run changes."""
        with self._lock:
            entry = self._runs.get((namespace, run))
            return entry.version if entry else 0
