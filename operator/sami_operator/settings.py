"""Operator settings, from the environment (this module is the operator's only reader).

SAMI_WORKER_IMAGE        default image for stage pods (spec.pods.*.image overrides it)
SAMI_WORKER_SERVICE_ACCOUNT  default service account for stage pods
SAMI_NAMESPACES          comma-separated namespaces to watch; empty = all namespaces
SAMI_RECONCILE_SECONDS   how often each run's timer looks for news (default 5): a pass reads the
                         run's children from watches, and runs in full only when the run or a
                         child of it changed, or a deadline is due
SAMI_CREATES_PER_SECOND  backpressure: at most this many objects (workloads and their task
                         ConfigMaps) created per second, over all runs (default 50; bursts of as
                         many)
SAMI_LEADER_ELECTION     the name of the Lease (coordination.k8s.io/v1) replicas elect the active
                         one with; empty: no election, this process is active at once (one
                         replica only)
SAMI_LEADER_ELECTION_NAMESPACE  the Lease's namespace (default: the pod's, from the service
                         account; else "default")
SAMI_LEASE_SECONDS       how long a Lease is held without renewal before a standby takes over
                         (default 15; renewed every 2 s, given up after 10 s of failed renewals)
SAMI_POD_NAME            this replica's name in the Lease (default: the host name)
SAMI_LIVENESS_PORT       liveness endpoint port (default 8080)
SAMI_LIVENESS_ADDRESS    IP address the liveness endpoint binds to (default 0.0.0.0: the kubelet
                         probes the pod IP; :: for every IPv6 and IPv4 address)
SAMI_METRICS_PORT        Prometheus metrics port (default 9090; 0 disables)
SAMI_METRICS_ADDRESS     IP address the metrics server binds to (default 0.0.0.0: Prometheus
                         scrapes the pod IP; 127.0.0.1 keeps it to the pod, e.g. a sidecar)
SAMI_PREFIX              finalizer and annotation prefix (default sami.dev)
SAMI_PYTHON              the Python command in stage pods (default python)
SAMI_DEFAULT_STORAGE     storage for runs without spec.storage: a JSON object with the fields of
                         spec.storage, e.g. {"uri": "s3://bucket/runs", "credentials":
                         {"secretName": "sami-s3"}}; unset: spec.storage is required
SAMI_STORAGE_CLEANUP_ATTEMPTS  cleanup.storageOnDelete: delete: how many cleanup Jobs may fail
                         before the operator gives up and lets the SAMIRun go, its storage left
                         behind (default 3; 1 to 101)
SAMI_STORAGE_CLEANUP_SECONDS   how long the storage cleanup may hold a deleted SAMIRun before the
                         operator gives up the same way (default 3600)
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
from dataclasses import dataclass, field

from pydantic import ValidationError

from sami_operator.models import MAX_RESTARTS, StorageSpec


@dataclass(frozen=True)
class OperatorSettings:
    worker_image: str = "ghcr.io/sami-project/sami-worker:0.1.0"
    worker_service_account: str | None = None
    namespaces: tuple[str, ...] = ()
    reconcile_seconds: float = 5.0
    liveness_port: int = 8080
    liveness_address: str = "0.0.0.0"
    metrics_port: int = 9090
    metrics_address: str = "0.0.0.0"
    prefix: str = "sami.dev"
    python: str = "python"
    launchers: frozenset[str] = field(default_factory=lambda: frozenset({"Job"}))
    default_storage: StorageSpec | None = None
    storage_cleanup_attempts: int = 3
    storage_cleanup_seconds: float = 3600.0
    creates_per_second: float = 50.0
    leader_election: str | None = None  # the Lease's name
    leader_election_namespace: str = "default"
    lease_seconds: float = 15.0
    identity: str = "sami-operator"
    # The cluster's Job controller retries each index of an Indexed Job on its own
    # (backoffLimitPerIndex, Kubernetes 1.29+): discovered at startup, not configured.
    indexed_jobs: bool = False

    @property
    def finalizer(self) -> str:
        return f"{self.prefix}/finalizer"

    @property
    def liveness_endpoint(self) -> str:
        """Kopf's liveness URL; IPv6 addresses in brackets."""
        host = self.liveness_address
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.liveness_port}/healthz"


def from_env(env: dict[str, str] | None = None) -> OperatorSettings:
    env = dict(os.environ if env is None else env)
    defaults = OperatorSettings()
    namespaces = tuple(n.strip() for n in env.get("SAMI_NAMESPACES", "").split(",") if n.strip())
    return OperatorSettings(
        worker_image=env.get("SAMI_WORKER_IMAGE", defaults.worker_image),
        worker_service_account=env.get("SAMI_WORKER_SERVICE_ACCOUNT") or None,
        namespaces=namespaces,
        reconcile_seconds=float(env.get("SAMI_RECONCILE_SECONDS", defaults.reconcile_seconds)),
        liveness_port=int(env.get("SAMI_LIVENESS_PORT", defaults.liveness_port)),
        liveness_address=_address(
            "SAMI_LIVENESS_ADDRESS", env.get("SAMI_LIVENESS_ADDRESS", defaults.liveness_address)
        ),
        metrics_port=int(env.get("SAMI_METRICS_PORT", defaults.metrics_port)),
        metrics_address=_address(
            "SAMI_METRICS_ADDRESS", env.get("SAMI_METRICS_ADDRESS", defaults.metrics_address)
        ),
        prefix=env.get("SAMI_PREFIX", defaults.prefix),
        python=env.get("SAMI_PYTHON", defaults.python),
        default_storage=_storage(env.get("SAMI_DEFAULT_STORAGE", "").strip()),
        storage_cleanup_attempts=_cleanup_attempts(
            env.get("SAMI_STORAGE_CLEANUP_ATTEMPTS", str(defaults.storage_cleanup_attempts))
        ),
        storage_cleanup_seconds=float(
            env.get("SAMI_STORAGE_CLEANUP_SECONDS", defaults.storage_cleanup_seconds)
        ),
        creates_per_second=_positive(
            "SAMI_CREATES_PER_SECOND", env.get("SAMI_CREATES_PER_SECOND"), 50.0, 0.1
        ),
        leader_election=env.get("SAMI_LEADER_ELECTION", "").strip() or None,
        leader_election_namespace=(
            env.get("SAMI_LEADER_ELECTION_NAMESPACE", "").strip() or _pod_namespace()
        ),
        lease_seconds=_positive("SAMI_LEASE_SECONDS", env.get("SAMI_LEASE_SECONDS"), 15.0, 3.0),
        identity=env.get("SAMI_POD_NAME") or socket.gethostname(),
    )


def _positive(variable: str, text: str | None, default: float, least: float) -> float:
    if text is None or not text.strip():
        return default
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value >= least:
        raise ValueError(f"{variable}: {text!r} is not a number >= {least:g}")
    return value


# Where Kubernetes mounts a pod's service account: its namespace is the pod's.
SERVICE_ACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


def _pod_namespace() -> str:
    try:
        with open(SERVICE_ACCOUNT_NAMESPACE) as f:
            return f.read().strip() or "default"
    except OSError:
        return "default"


def _cleanup_attempts(text: str) -> int:
    """Cleanup Jobs are named like a stage's retries (`<run>-cleanup-r<attempt>`), so the run
    name's length budget allows MAX_RESTARTS + 1 of them."""
    attempts = int(text)
    if not 1 <= attempts <= MAX_RESTARTS + 1:
        raise ValueError(
            f"SAMI_STORAGE_CLEANUP_ATTEMPTS: {attempts} is not between 1 and {MAX_RESTARTS + 1}"
        )
    return attempts


def _address(variable: str, text: str) -> str:
    """A bind address: an IPv4 or IPv6 address, not a host name (which would be resolved, and
    could resolve to something else than the interface meant)."""
    try:
        return str(ipaddress.ip_address(text.strip()))
    except ValueError:
        raise ValueError(
            f"{variable}: {text!r} is not an IP address (0.0.0.0 for every IPv4 interface, "
            f":: for every interface, 127.0.0.1 for the pod only)"
        ) from None


def _storage(text: str) -> StorageSpec | None:
    if not text:
        return None
    try:
        return StorageSpec.model_validate(json.loads(text))
    except (json.JSONDecodeError, ValidationError) as err:
        raise ValueError(
            f"SAMI_DEFAULT_STORAGE: not a storage spec (a JSON object with the fields of "
            f"spec.storage: uri, endpointUrl, region, forcePathStyle, credentials): {err}"
        ) from None
