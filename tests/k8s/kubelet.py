"""LocalKubelet: plays the kubelet for the test control plane by running pods as local processes.

The test control plane (tests.k8s.controlplane) has no scheduler and no kubelet, so Pods stay
Pending. LocalKubelet, a background thread, does what a scheduler plus kubelet would do for the
pods a test creates (directly or through the real Job controller):

1. Registers a Node (default name ``local-kubelet``, Ready, labels kubernetes.io/hostname/os/arch).
2. Polls Pods (all namespaces but kube-*, or the ones given). A Pending pod with no
   ``spec.nodeName`` and the default scheduler is bound to the node with a real Binding; a pod
   created with ``spec.nodeName`` equal to the node is run as is.
3. Runs the pod's init containers one after another, then its FIRST container only, as a local
   process (its own process group), with:
   - argv = ``command + args`` (the image is ignored; a container without ``command`` fails: image
     entrypoints are unknown here), ``$(VAR)`` references expanded as Kubernetes does;
   - argv[0] mapped through ``command_map`` (default: ``python``/``python3``/``/usr/bin/python3``/
     ``/usr/local/bin/python`` -> this interpreter (``sys.executable``), ``torchrun`` and ``sami``
     -> the venv's, ``sh``/``bash`` -> /bin/sh, /bin/bash) and then checked by ``allow``: by default
     only the mapped targets may run, so the harness never runs a binary a test did not intend;
   - the environment: PATH (venv bin first), LANG/LC_ALL/TZ/TMPDIR, host variables matching
     ``inherit_env`` patterns, ``extra_env``, HOSTNAME=<pod name>, KUBERNETES_SERVICE_HOST/PORT
     pointing at the test apiserver; then the container's ``envFrom`` (configMapRef, secretRef,
     prefix, optional) and ``env`` (value, valueFrom secretKeyRef/configMapKeyRef/fieldRef/
     resourceFieldRef) in Kubernetes order;
   - working directory: ``workingDir`` mapped as below, else a fresh directory in the pod's dir.

   Volume mounts cannot really be mounted, so they are MAPPED: every volume is materialised in a
   local directory (configMap and secret: one file per key or per ``items`` entry; projected:
   configMap/secret/downwardAPI/serviceAccountToken sources; downwardAPI; emptyDir: an empty
   directory; hostPath: the host path itself). Then every occurrence of a volumeMount's
   ``mountPath`` (at a path boundary: ``/etc/sami`` matches ``/etc/sami`` and ``/etc/sami/x``, not
   ``/etc/samix`` or ``/a/etc/sami``) in the command, args, env values and workingDir is replaced by
   the local directory (``subPath`` appended). The container's ``terminationMessagePath`` (default
   /dev/termination-log) is mapped the same way to a local file. Paths a program hard-codes
   (e.g. /var/run/secrets/kubernetes.io/serviceaccount/token inside a client library) are NOT
   mapped: pass paths on the command line or in env.
   persistentVolumeClaim and other volume types fail the pod (reason ``UnsupportedVolume``).
   A missing ConfigMap/Secret (or key) that is not optional, for a volume or for env, keeps the
   pod Pending with a waiting ``CreateContainerConfigError`` status, retried every second, as a
   kubelet does.
   Images are not pulled, except that an image whose registry host is under ``.invalid`` (a
   top-level domain reserved never to resolve, so no kubelet could pull it) keeps the pod
   Pending with a waiting ``ErrImagePull`` then ``ImagePullBackOff`` status, as a kubelet
   shows an image that cannot be pulled.
4. Patches pod status: Running (startTime, podIP/hostIP 127.0.0.1, Ready conditions,
   containerStatuses[0].state.running) when the container starts; Succeeded/Failed with
   ``state.terminated`` (exitCode, reason Completed/Error, message from the termination message
   file, or the log tail for FallbackToLogsOnError) when it exits. restartPolicy OnFailure/Always
   restart the process in place (restartCount, lastState), with a short backoff. So the real Job
   controller in kube-controller-manager completes and fails Jobs (backoffLimit included).
5. A pod being deleted (deletionTimestamp set) has its process group sent SIGTERM, then SIGKILL
   after the grace period (capped at ``max_grace_seconds``); then the pod is removed with
   gracePeriodSeconds=0 as a kubelet does, so namespace deletion and garbage collection finish.

Output of each container goes to ``<workdir>/<namespace>/<pod>-<uid8>/<container>.log``
(``LocalKubelet.logs()``); ``kubectl logs`` does not work (no kubelet server).

Training operators live beside this module: ``tests/k8s/training_operators.py`` emulates the
Kubeflow PyTorchJob controller (kubeflow.org/v1) and the JobSet controller (jobset.x-k8s.io/
v1alpha2), with CRD stand-ins in ``tests/k8s/crds/``; the Pods they (or the Jobs they create)
make are run by this LocalKubelet.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import fnmatch
import logging
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.k8s.controlplane import ApiError, ControlPlane, KubeClient

log = logging.getLogger("tests.k8s.kubelet")

VENV_BIN = Path(sys.executable).parent
SYSTEM_NAMESPACES = ("kube-system", "kube-public", "kube-node-lease")
DEFAULT_INHERIT_ENV = ("HF_*", "TRANSFORMERS_*", "VLLM_*", "OMP_NUM_THREADS", "SAMI_CACHE_DIR")
DEFAULT_TERMINATION_PATH = "/dev/termination-log"
MAX_TERMINATION_MESSAGE = 4096


def default_command_map() -> dict[str, str]:
    m = {
        "python": sys.executable,
        "python3": sys.executable,
        "/usr/bin/python": sys.executable,
        "/usr/bin/python3": sys.executable,
        "/usr/local/bin/python": sys.executable,
        "/usr/local/bin/python3": sys.executable,
        "sh": "/bin/sh",
        "/bin/sh": "/bin/sh",
        "bash": "/bin/bash",
        "/bin/bash": "/bin/bash",
    }
    for tool in ("torchrun", "sami"):
        if (VENV_BIN / tool).exists():
            m[tool] = str(VENV_BIN / tool)
            m[f"/usr/local/bin/{tool}"] = str(VENV_BIN / tool)
    return m


def unpullable_image(image: str) -> bool:
    """An image whose registry host is under the reserved .invalid top-level domain."""
    host = image.split("/", 1)[0] if "/" in image else ""
    return host.split(":", 1)[0].endswith(".invalid")


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def expand_vars(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: defined variables replaced, `$$` escapes, others kept."""

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1)
        return env[name] if name in env else m.group(0)

    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)", sub, text)


class PathMap:
    """Replaces in-pod absolute paths (mountPaths) by local paths, at path boundaries."""

    def __init__(self, mapping: dict[str, str]):
        self.mapping = {k.rstrip("/") or "/": v for k, v in mapping.items() if k.rstrip("/")}
        keys = sorted(self.mapping, key=len, reverse=True)
        self._re = (
            re.compile(r"(?<![\w./-])(" + "|".join(re.escape(k) for k in keys) + r")(?![\w.-])")
            if keys
            else None
        )

    def __call__(self, text: str) -> str:
        if self._re is None:
            return text
        return self._re.sub(lambda m: self.mapping[m.group(1)], text)


class PodConfigError(Exception):
    """A referenced ConfigMap/Secret/key is missing (the pod waits, as with a kubelet)."""


class PodUnsupported(Exception):
    """Something the LocalKubelet cannot emulate: the pod fails with this reason."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class PodRun:
    namespace: str
    name: str
    uid: str
    dir: Path
    pod: dict
    thread: threading.Thread | None = None
    proc: subprocess.Popen | None = None
    delete_grace: float | None = None
    done: threading.Event = field(default_factory=threading.Event)
    wake: threading.Event = field(default_factory=threading.Event)
    exit_code: int | None = None
    start_time: str | None = None

    @property
    def path(self) -> str:
        return f"/api/v1/namespaces/{self.namespace}/pods/{self.name}"


class LocalKubelet:
    def __init__(
        self,
        control_plane: ControlPlane,
        workdir: Path | str,
        *,
        node_name: str = "local-kubelet",
        namespaces: Iterable[str] | None = None,
        command_map: dict[str, str] | None = None,
        allow: Callable[[list[str]], bool] | None = None,
        extra_env: dict[str, str] | None = None,
        inherit_env: Iterable[str] = DEFAULT_INHERIT_ENV,
        poll_interval: float = 0.2,
        restart_backoff: float = 1.0,
        max_grace_seconds: float = 10.0,
    ):
        self.cp = control_plane
        self.workdir = Path(workdir)
        self.node_name = node_name
        self.namespaces = set(namespaces) if namespaces is not None else None
        self.excluded: set[str] = set()
        self.command_map = default_command_map() if command_map is None else dict(command_map)
        self._allow = allow
        self.extra_env = dict(extra_env or {})
        self.inherit_env = tuple(inherit_env)
        self.poll_interval = poll_interval
        self.restart_backoff = restart_backoff
        self.max_grace_seconds = max_grace_seconds
        self.runs: dict[str, PodRun] = {}
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # ----------------------------------------------------------------------------- public
    def start(self) -> LocalKubelet:
        self.workdir.mkdir(parents=True, exist_ok=True)
        with self.cp.client() as api:
            self._register_node(api)
        self._thread = threading.Thread(target=self._loop, name="local-kubelet", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stops polling and kills every process still running (no status patches)."""
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=10)
        with self._lock:
            runs = list(self.runs.values())
        for run in runs:
            run.wake.set()
            self._kill(run, grace=2.0)
        for run in runs:
            if run.thread:
                run.thread.join(timeout=10)

    def __enter__(self) -> LocalKubelet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def add_namespace(self, namespace: str) -> None:
        self.excluded.discard(namespace)
        if self.namespaces is not None:
            self.namespaces.add(namespace)

    def exclude_namespace(self, namespace: str) -> None:
        """Leaves the namespace's new pods alone (e.g. for a test running its own kubelet)."""
        self.excluded.add(namespace)

    def allowed(self, argv: list[str]) -> bool:
        if self._allow is not None:
            return self._allow(argv)
        return bool(argv) and argv[0] in set(self.command_map.values())

    def run_for(self, namespace: str, name: str) -> PodRun | None:
        """The latest pod of that name this kubelet ran (a recreated pod replaces the older)."""
        found = None
        with self._lock:
            for run in self.runs.values():
                if run.namespace == namespace and run.name == name:
                    found = run
        return found

    def logs(self, namespace: str, name: str, container: str | None = None) -> str:
        run = self.run_for(namespace, name)
        if run is None:
            raise KeyError(f"pod {namespace}/{name} was not run by this LocalKubelet")
        container = container or run.pod["spec"]["containers"][0]["name"]
        path = run.dir / f"{container}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def in_scope(self, namespace: str) -> bool:
        if namespace in self.excluded:
            return False
        if self.namespaces is None:
            return namespace not in SYSTEM_NAMESPACES
        return namespace in self.namespaces

    # ----------------------------------------------------------------------------- loop
    def _register_node(self, api: KubeClient) -> None:
        arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine)
        node = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": self.node_name,
                "labels": {
                    "kubernetes.io/hostname": self.node_name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": arch,
                },
            },
        }
        try:
            api.create("/api/v1/nodes", node)
        except ApiError as e:
            if e.status_code != 409:
                raise
        resources = {"cpu": str(os.cpu_count() or 1), "memory": "16Gi", "pods": "110"}
        api.merge_patch(
            f"/api/v1/nodes/{self.node_name}/status",
            {
                "status": {
                    "capacity": resources,
                    "allocatable": resources,
                    "addresses": [
                        {"type": "InternalIP", "address": "127.0.0.1"},
                        {"type": "Hostname", "address": self.node_name},
                    ],
                    "conditions": [
                        {
                            "type": "Ready",
                            "status": "True",
                            "reason": "LocalKubeletReady",
                            "message": "LocalKubelet runs pods as local processes",
                            "lastHeartbeatTime": now(),
                            "lastTransitionTime": now(),
                        }
                    ],
                }
            },
        )

    def _loop(self) -> None:
        with self.cp.client() as api:
            while not self._stop.is_set():
                try:
                    self._sync(api)
                except Exception as e:  # keep the kubelet alive; record for debugging
                    msg = f"LocalKubelet sync error: {e!r}"
                    log.warning(msg)
                    self.errors.append(msg)
                    del self.errors[:-50]
                self._stop.wait(self.poll_interval)

    def _list_pods(self, api: KubeClient) -> list[dict]:
        if self.namespaces is None:
            return api.get("/api/v1/pods")["items"]
        pods = []
        for ns in sorted(self.namespaces):
            pods += api.get(f"/api/v1/namespaces/{ns}/pods")["items"]
        return pods

    def _sync(self, api: KubeClient) -> None:
        pods = self._list_pods(api)
        seen = set()
        for pod in pods:
            meta, spec = pod["metadata"], pod["spec"]
            uid, ns, name = meta["uid"], meta["namespace"], meta["name"]
            seen.add(uid)
            node = spec.get("nodeName") or ""
            with self._lock:
                run = self.runs.get(uid)
            if meta.get("deletionTimestamp"):
                if run is not None:
                    if run.delete_grace is None:
                        grace = meta.get("deletionGracePeriodSeconds", 30)
                        run.delete_grace = min(float(grace), self.max_grace_seconds)
                        run.wake.set()
                    # the pod thread removes the pod once the process is gone
                    if run.done.is_set():
                        self._finalize_delete(api, ns, name, uid)
                elif node == self.node_name:
                    self._finalize_delete(api, ns, name, uid)
                continue
            if run is not None:
                continue
            phase = (pod.get("status") or {}).get("phase", "Pending")
            if phase in ("Succeeded", "Failed"):
                continue
            if not node:
                if not self.in_scope(ns):
                    continue
                if spec.get("schedulerName", "default-scheduler") != "default-scheduler":
                    continue
                try:
                    api.create(
                        f"/api/v1/namespaces/{ns}/pods/{name}/binding",
                        {
                            "apiVersion": "v1",
                            "kind": "Binding",
                            "metadata": {"name": name, "uid": uid},
                            "target": {"apiVersion": "v1", "kind": "Node", "name": self.node_name},
                        },
                    )
                except ApiError as e:
                    if e.status_code in (404, 409):
                        continue
                    raise
            elif node != self.node_name:
                continue
            self._start_pod(pod)
        # Pods removed outright (grace 0 by someone else): their processes go too.
        with self._lock:
            gone = [r for uid, r in self.runs.items() if uid not in seen and not r.done.is_set()]
        for run in gone:
            run.delete_grace = 0.0
            run.wake.set()

    def _finalize_delete(self, api: KubeClient, ns: str, name: str, uid: str) -> None:
        with contextlib.suppress(ApiError):
            api.request(
                "DELETE",
                f"/api/v1/namespaces/{ns}/pods/{name}",
                {
                    "apiVersion": "v1",
                    "kind": "DeleteOptions",
                    "gracePeriodSeconds": 0,
                    "preconditions": {"uid": uid},
                },
            )

    def _start_pod(self, pod: dict) -> None:
        meta = pod["metadata"]
        run = PodRun(
            namespace=meta["namespace"],
            name=meta["name"],
            uid=meta["uid"],
            dir=self.workdir / meta["namespace"] / f"{meta['name']}-{meta['uid'][:8]}",
            pod=pod,
        )
        run.dir.mkdir(parents=True, exist_ok=True)
        run.thread = threading.Thread(
            target=self._pod_main, args=(run,), name=f"pod-{run.name}", daemon=True
        )
        with self._lock:
            self.runs[run.uid] = run
        run.thread.start()

    # ----------------------------------------------------------------------------- a pod
    def _pod_main(self, run: PodRun) -> None:
        with self.cp.client() as api:
            try:
                self._run_pod(api, run)
            except PodUnsupported as e:
                self._patch_terminal(api, run, "Failed", e.reason, str(e))
            except Exception as e:
                log.exception("pod %s/%s", run.namespace, run.name)
                self._patch_terminal(api, run, "Failed", "LocalKubeletError", repr(e))
            finally:
                run.done.set()
                if run.delete_grace is not None and not self._stop.is_set():
                    self._finalize_delete(api, run.namespace, run.name, run.uid)

    def _cancelled(self, run: PodRun) -> bool:
        return self._stop.is_set() or run.delete_grace is not None

    def _run_pod(self, api: KubeClient, run: PodRun) -> None:
        pod = run.pod
        spec = pod["spec"]
        start_time = run.start_time = now()
        containers = [*(spec.get("initContainers") or []), *spec["containers"]]
        unpullable = [c for c in containers if unpullable_image(c.get("image", ""))]
        reason = "ErrImagePull"
        while unpullable:
            image = unpullable[0]["image"]
            message = f'Failed to pull image "{image}": no such host'
            self._patch(
                api,
                run,
                {
                    "phase": "Pending",
                    "containerStatuses": [
                        self._waiting_status(c, reason, message) for c in spec["containers"]
                    ],
                },
            )
            reason = "ImagePullBackOff"
            run.wake.wait(1.0)
            run.wake.clear()
            if self._cancelled(run):
                return
        # Volumes and env: retried while a referenced object is missing, as a kubelet does.
        while True:
            try:
                volumes = self._materialise_volumes(api, run)
                for c in [*(spec.get("initContainers") or []), *spec["containers"]]:
                    self._container_env(api, run, c)
                break
            except PodConfigError as e:
                self._patch(
                    api,
                    run,
                    {
                        "phase": "Pending",
                        "containerStatuses": [
                            self._waiting_status(c, "CreateContainerConfigError", str(e))
                            for c in spec["containers"]
                        ],
                    },
                )
                run.wake.wait(1.0)
                run.wake.clear()
                if self._cancelled(run):
                    return

        for init in spec.get("initContainers") or []:
            while True:
                code, _, _, _ = self._run_container(api, run, init, volumes)
                if self._cancelled(run):
                    return
                if code == 0:
                    break
                if spec.get("restartPolicy", "Always") == "Never":
                    raise PodUnsupported(
                        "InitContainerFailed", f"init container {init['name']} exited with {code}"
                    )
                run.wake.wait(self.restart_backoff)

        container = spec["containers"][0]
        policy = spec.get("restartPolicy", "Always")
        restarts = 0
        last_state: dict = {}
        while True:
            code, started, finished, message = self._run_container(
                api,
                run,
                container,
                volumes,
                restarts=restarts,
                last_state=last_state,
                start_time=start_time,
            )
            if self._cancelled(run):
                return
            terminated = {
                "exitCode": code,
                "reason": "Completed" if code == 0 else "Error",
                "startedAt": started,
                "finishedAt": finished,
                "containerID": f"local://{run.uid}/{container['name']}",
            }
            if message:
                terminated["message"] = message
            restart = policy == "Always" or (policy == "OnFailure" and code != 0)
            if not restart:
                run.exit_code = code
                phase = "Succeeded" if code == 0 else "Failed"
                self._patch_terminal(api, run, phase, None, None, terminated, restarts)
                return
            restarts += 1
            last_state = {"terminated": terminated}
            delay = min(self.restart_backoff * 2 ** (restarts - 1), 10.0)
            run.wake.wait(delay)
            run.wake.clear()
            if self._cancelled(run):
                return

    def _run_container(
        self,
        api: KubeClient,
        run: PodRun,
        container: dict,
        volumes: dict[str, Path],
        *,
        restarts: int = 0,
        last_state: dict | None = None,
        start_time: str | None = None,
    ) -> tuple[int, str, str, str]:
        cname = container["name"]
        mapping: dict[str, str] = {}
        for m in container.get("volumeMounts") or []:
            if m["name"] not in volumes:
                raise PodUnsupported("InvalidVolumeMount", f"no volume {m['name']!r}")
            local = volumes[m["name"]]
            if m.get("subPath"):
                local = local / m["subPath"]
                if not local.exists():
                    local.mkdir(parents=True)
            mapping[m["mountPath"]] = str(local)
        term_in_pod = container.get("terminationMessagePath") or DEFAULT_TERMINATION_PATH
        term_file = run.dir / f"{cname}.termination-log"
        term_file.write_text("")
        mapping[term_in_pod] = str(term_file)
        pathmap = PathMap(mapping)

        env = self._container_env(api, run, container)
        env = {k: pathmap(v) for k, v in env.items()}
        argv = [expand_vars(a, env) for a in (container.get("command") or [])]
        argv += [expand_vars(a, env) for a in (container.get("args") or [])]
        if not container.get("command"):
            raise PodUnsupported(
                "NoCommand",
                f"container {cname} has no command: LocalKubelet cannot know image entrypoints",
            )
        argv = [pathmap(a) for a in argv]
        argv[0] = self.command_map.get(argv[0], argv[0])
        if not self.allowed(argv):
            raise PodUnsupported(
                "CommandNotAllowed",
                f"LocalKubelet refuses to run {argv[0]!r} (allowed: "
                f"{sorted(set(self.command_map.values()))})",
            )
        if container.get("workingDir"):
            wd = pathmap(container["workingDir"])
            cwd = Path(wd) if wd != container["workingDir"] else run.dir / "rootfs" / wd.lstrip("/")
        else:
            cwd = run.dir / "work"
        cwd.mkdir(parents=True, exist_ok=True)

        started = now()
        logfile = run.dir / f"{cname}.log"
        with open(logfile, "ab") as out:
            run.proc = subprocess.Popen(
                argv,
                env=env,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        is_main = container is run.pod["spec"]["containers"][0]
        if is_main:
            status = {
                "name": cname,
                "image": container.get("image", ""),
                "imageID": "",
                "containerID": f"local://{run.uid}/{cname}",
                "ready": True,
                "started": True,
                "restartCount": restarts,
                "state": {"running": {"startedAt": started}},
            }
            if last_state:
                status["lastState"] = last_state
            others = [
                self._waiting_status(c, "NotRunByLocalKubelet", "only the first container runs")
                for c in run.pod["spec"]["containers"][1:]
            ]
            self._patch(
                api,
                run,
                {
                    "phase": "Running",
                    "hostIP": "127.0.0.1",
                    "podIP": "127.0.0.1",
                    "podIPs": [{"ip": "127.0.0.1"}],
                    "startTime": start_time or started,
                    "conditions": self._conditions(True),
                    "containerStatuses": [status] + others,
                },
            )
        # Wait for exit, or a deletion / stop request.
        while run.proc.poll() is None:
            if self._cancelled(run):
                self._kill(run, run.delete_grace if run.delete_grace is not None else 2.0)
                break
            run.wake.wait(0.2)
            run.wake.clear()
        code = run.proc.wait()
        if code < 0:
            code = 128 - code  # killed by signal N: 128+N, as container runtimes report
        finished = now()
        message = term_file.read_bytes()[:MAX_TERMINATION_MESSAGE].decode(errors="replace").strip()
        if (
            not message
            and code != 0
            and container.get("terminationMessagePolicy") == "FallbackToLogsOnError"
        ):
            lines = logfile.read_text(errors="replace").splitlines()[-80:]
            message = "\n".join(lines)[-2048:]
        return code, started, finished, message

    def _kill(self, run: PodRun, grace: float) -> None:
        proc = run.proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=max(grace, 0.1))
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)

    # ------------------------------------------------------------------------- status
    def _conditions(self, ready: bool, reason: str | None = None) -> list[dict]:
        t = now()
        conds = []
        for ctype in ("Initialized", "Ready", "ContainersReady", "PodScheduled"):
            status = "True" if (ready or ctype in ("Initialized", "PodScheduled")) else "False"
            c = {"type": ctype, "status": status, "lastProbeTime": None, "lastTransitionTime": t}
            if status == "False" and reason:
                c["reason"] = reason
            conds.append(c)
        return conds

    @staticmethod
    def _waiting_status(container: dict, reason: str, message: str) -> dict:
        return {
            "name": container["name"],
            "image": container.get("image", ""),
            "imageID": "",
            "ready": False,
            "started": False,
            "restartCount": 0,
            "state": {"waiting": {"reason": reason, "message": message}},
        }

    def _patch(self, api: KubeClient, run: PodRun, status: dict) -> None:
        if self._stop.is_set():
            return
        try:
            api.merge_patch(f"{run.path}/status", {"metadata": {"uid": run.uid}, "status": status})
        except ApiError as e:
            if e.status_code not in (404, 409):
                raise

    def _patch_terminal(
        self,
        api: KubeClient,
        run: PodRun,
        phase: str,
        reason: str | None,
        message: str | None,
        terminated: dict | None = None,
        restarts: int = 0,
    ) -> None:
        containers = run.pod["spec"]["containers"]
        t = now()
        if terminated is None:
            terminated = {
                "exitCode": 128,
                "reason": reason or "Error",
                "message": (message or "")[:MAX_TERMINATION_MESSAGE],
                "startedAt": t,
                "finishedAt": t,
            }
        statuses = [
            {
                "name": containers[0]["name"],
                "image": containers[0].get("image", ""),
                "imageID": "",
                "containerID": f"local://{run.uid}/{containers[0]['name']}",
                "ready": False,
                "started": False,
                "restartCount": restarts,
                "state": {"terminated": terminated},
            }
        ]
        for c in containers[1:]:
            statuses.append(
                {
                    "name": c["name"],
                    "image": c.get("image", ""),
                    "imageID": "",
                    "ready": False,
                    "started": False,
                    "restartCount": 0,
                    "state": {
                        "terminated": {
                            "exitCode": 0,
                            "reason": "NotRunByLocalKubelet",
                            "startedAt": t,
                            "finishedAt": t,
                        }
                    },
                }
            )
        status: dict[str, Any] = {
            "phase": phase,
            "hostIP": "127.0.0.1",
            "podIP": "127.0.0.1",
            "podIPs": [{"ip": "127.0.0.1"}],
            "conditions": self._conditions(False, "PodCompleted"),
            "containerStatuses": statuses,
        }
        if reason:
            status["reason"] = reason
            status["message"] = message or ""
        status["startTime"] = run.start_time or t
        self._patch(api, run, status)

    # ---------------------------------------------------------------------- env, volumes
    def _get_object(
        self, api: KubeClient, run: PodRun, kind: str, name: str, optional: bool
    ) -> dict | None:
        try:
            return api.get(f"/api/v1/namespaces/{run.namespace}/{kind}/{name}")
        except ApiError as e:
            if e.status_code != 404:
                raise
            if optional:
                return None
            raise PodConfigError(f'{kind[:-1]} "{name}" not found') from None  # kubelet's words

    @staticmethod
    def _object_data(obj: dict | None, kind: str) -> dict[str, bytes]:
        if obj is None:
            return {}
        if kind == "secrets":
            return {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
        data = {k: v.encode() for k, v in (obj.get("data") or {}).items()}
        data.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
        return data

    def _field_ref(self, run: PodRun, path: str) -> str:
        meta, spec = run.pod["metadata"], run.pod["spec"]
        m = re.fullmatch(r"metadata\.(labels|annotations)\['([^']*)'\]", path)
        if m:
            return (meta.get(m.group(1)) or {}).get(m.group(2), "")
        values = {
            "metadata.name": meta["name"],
            "metadata.namespace": meta["namespace"],
            "metadata.uid": meta["uid"],
            "spec.nodeName": self.node_name,
            "spec.serviceAccountName": spec.get("serviceAccountName", "default"),
            "status.hostIP": "127.0.0.1",
            "status.podIP": "127.0.0.1",
            "status.podIPs": "127.0.0.1",
        }
        if path not in values:
            raise PodUnsupported("UnsupportedFieldRef", f"fieldRef {path!r} not emulated")
        return values[path]

    @staticmethod
    def _resource_ref(container: dict, resource: str) -> str:
        kind, _, name = resource.partition(".")
        res = container.get("resources") or {}
        value = (res.get(kind) or {}).get(name) or (res.get("limits") or {}).get(name)
        if value is None:
            value = str(os.cpu_count() or 1) if name == "cpu" else "0"
        return str(value)

    def _container_env(self, api: KubeClient, run: PodRun, container: dict) -> dict[str, str]:
        env: dict[str, str] = {
            "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}",
            "HOME": str(run.dir / "home"),
            "HOSTNAME": run.name,
            "KUBERNETES_SERVICE_HOST": "127.0.0.1",
            "KUBERNETES_SERVICE_PORT": str(self.cp.port),
            "KUBERNETES_SERVICE_PORT_HTTPS": str(self.cp.port),
        }
        (run.dir / "home").mkdir(exist_ok=True)
        for k in ("LANG", "LC_ALL", "TZ", "TMPDIR"):
            if k in os.environ:
                env[k] = os.environ[k]
        for k, v in os.environ.items():
            if any(fnmatch.fnmatchcase(k, p) for p in self.inherit_env):
                env[k] = v
        env.update(self.extra_env)
        for src in container.get("envFrom") or []:
            prefix = src.get("prefix", "")
            for key, kind in (("configMapRef", "configmaps"), ("secretRef", "secrets")):
                if key in src:
                    ref = src[key]
                    obj = self._get_object(api, run, kind, ref["name"], ref.get("optional", False))
                    for k, v in self._object_data(obj, kind).items():
                        env[prefix + k] = v.decode(errors="replace")
        for var in container.get("env") or []:
            name = var["name"]
            if "valueFrom" not in var:
                env[name] = expand_vars(var.get("value", ""), env)
                continue
            vf = var["valueFrom"]
            if "fieldRef" in vf:
                env[name] = self._field_ref(run, vf["fieldRef"]["fieldPath"])
            elif "resourceFieldRef" in vf:
                env[name] = self._resource_ref(container, vf["resourceFieldRef"]["resource"])
            else:
                for key, kind in (("configMapKeyRef", "configmaps"), ("secretKeyRef", "secrets")):
                    if key in vf:
                        ref = vf[key]
                        optional = ref.get("optional", False)
                        obj = self._get_object(api, run, kind, ref["name"], optional)
                        data = self._object_data(obj, kind)
                        if ref["key"] in data:
                            env[name] = data[ref["key"]].decode(errors="replace")
                        elif not optional:
                            raise PodConfigError(
                                f"key {ref['key']!r} not in {kind[:-1]} {ref['name']!r}"
                            )
                        break
                else:
                    raise PodUnsupported("UnsupportedEnv", f"env {name}: {vf} not emulated")
        return env

    def _write_items(self, target: Path, data: dict[str, bytes], items: list | None) -> None:
        if items:
            for item in items:
                if item["key"] in data:
                    path = target / item["path"]
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(data[item["key"]])
        else:
            for k, v in data.items():
                (target / k).write_bytes(v)

    def _service_account_token(self, api: KubeClient, run: PodRun, src: dict) -> bytes:
        sa = run.pod["spec"].get("serviceAccountName") or "default"
        spec: dict[str, Any] = {"expirationSeconds": src.get("expirationSeconds", 3600)}
        if src.get("audience"):
            spec["audiences"] = [src["audience"]]
        tr = api.create(
            f"/api/v1/namespaces/{run.namespace}/serviceaccounts/{sa}/token",
            {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec},
        )
        return tr["status"]["token"].encode()

    def _materialise_volumes(self, api: KubeClient, run: PodRun) -> dict[str, Path]:
        out: dict[str, Path] = {}
        root = run.dir / "volumes"
        for vol in run.pod["spec"].get("volumes") or []:
            name = vol["name"]
            target = root / name
            if "hostPath" in vol:
                out[name] = Path(vol["hostPath"]["path"])
                continue
            target.mkdir(parents=True, exist_ok=True)
            out[name] = target
            if "emptyDir" in vol:
                continue
            if "configMap" in vol:
                src = vol["configMap"]
                obj = self._get_object(
                    api, run, "configmaps", src["name"], src.get("optional", False)
                )
                self._write_items(target, self._object_data(obj, "configmaps"), src.get("items"))
            elif "secret" in vol:
                src = vol["secret"]
                obj = self._get_object(
                    api, run, "secrets", src["secretName"], src.get("optional", False)
                )
                self._write_items(target, self._object_data(obj, "secrets"), src.get("items"))
            elif "downwardAPI" in vol:
                self._write_downward(run, target, vol["downwardAPI"].get("items") or [])
            elif "projected" in vol:
                for s in vol["projected"].get("sources") or []:
                    if "configMap" in s:
                        src = s["configMap"]
                        obj = self._get_object(
                            api, run, "configmaps", src["name"], src.get("optional", False)
                        )
                        self._write_items(
                            target, self._object_data(obj, "configmaps"), src.get("items")
                        )
                    elif "secret" in s:
                        src = s["secret"]
                        obj = self._get_object(
                            api, run, "secrets", src["name"], src.get("optional", False)
                        )
                        self._write_items(
                            target, self._object_data(obj, "secrets"), src.get("items")
                        )
                    elif "downwardAPI" in s:
                        self._write_downward(run, target, s["downwardAPI"].get("items") or [])
                    elif "serviceAccountToken" in s:
                        src = s["serviceAccountToken"]
                        (target / src["path"]).write_bytes(
                            self._service_account_token(api, run, src)
                        )
            else:
                kinds = sorted(k for k in vol if k != "name")
                raise PodUnsupported(
                    "UnsupportedVolume", f"volume {name!r} of type {kinds} not emulated"
                )
        return out

    def _write_downward(self, run: PodRun, target: Path, items: list) -> None:
        for item in items:
            if "fieldRef" not in item:
                raise PodUnsupported("UnsupportedVolume", f"downwardAPI item {item} not emulated")
            path = target / item["path"]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(self._field_ref(run, item["fieldRef"]["fieldPath"]))
