"""One active replica: leader election on a coordination.k8s.io/v1 Lease.

The Kubernetes client's `kubernetes.leaderelection` runs the election (try to acquire, renew
every retry period, give up after the renew deadline); it ships a ConfigMap lock only, so
`LeaseLock` here gives it a Lease, the object Kubernetes' own controllers elect with. A
replica that is not the leader does nothing but watch the Lease (and answer its liveness
probe); one that loses its Lease exits, and its pod restarts as a standby. The handover after a
crash takes the lease duration; a graceful stop releases the Lease, so the standby takes over
at its next retry.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from kubernetes import client
from kubernetes.client.exceptions import ApiException
from kubernetes.leaderelection import electionconfig, leaderelection
from kubernetes.leaderelection.leaderelectionrecord import LeaderElectionRecord

from sami_operator.settings import OperatorSettings

log = logging.getLogger(__name__)


class LeaseLock:
    """The lock interface kubernetes.leaderelection expects (get, create, update), on a
    Lease. Updates replace the Lease at the resourceVersion last read, so two candidates
    cannot both win the same expired Lease."""

    def __init__(self, name: str, namespace: str, identity: str, api: client.ApiClient):
        self.name, self.namespace, self.identity = name, namespace, identity
        self.api = client.CoordinationV1Api(api)
        self._lease: client.V1Lease | None = None
        self._released = threading.Event()

    def get(self, name: str, namespace: str):
        """(True, the record) or (False, the ApiException)."""
        try:
            self._lease = self.api.read_namespaced_lease(name, namespace)
        except ApiException as err:
            return False, err
        spec = self._lease.spec
        if spec is None or not spec.holder_identity:
            return True, None  # released or never held: free to take
        return True, LeaderElectionRecord(
            spec.holder_identity,
            str(spec.lease_duration_seconds),
            _text(spec.acquire_time),
            _text(spec.renew_time),
        )

    def create(self, name: str, namespace: str, election_record: LeaderElectionRecord) -> bool:
        if self._released.is_set():
            return False
        now = datetime.now(UTC)
        lease = client.V1Lease(
            metadata=client.V1ObjectMeta(name=name, namespace=namespace),
            spec=self._spec(election_record, now, now),
        )
        try:
            self._lease = self.api.create_namespaced_lease(namespace, lease)
        except ApiException as err:
            log.info("Lease %s/%s not created: %s", namespace, name, err.reason)
            return False
        return True

    def update(self, name: str, namespace: str, updated_record: LeaderElectionRecord) -> bool:
        if self._released.is_set() or self._lease is None:
            return False
        now = datetime.now(UTC)
        spec = self._lease.spec
        held = spec is not None and spec.holder_identity == updated_record.holder_identity
        acquired = spec.acquire_time if held and spec.acquire_time else now
        self._lease.spec = self._spec(updated_record, acquired, now)
        try:
            self._lease = self.api.replace_namespaced_lease(name, namespace, self._lease)
        except ApiException as err:
            log.info("Lease %s/%s not updated: %s", namespace, name, err.reason)
            return False
        return True

    @property
    def released(self) -> bool:
        return self._released.is_set()

    def release(self) -> None:
        """Stop renewing and hand the Lease back (holder cleared), if this replica holds it."""
        self._released.set()
        try:
            lease = self.api.read_namespaced_lease(self.name, self.namespace)
            if lease.spec is None or lease.spec.holder_identity != self.identity:
                return
            lease.spec.holder_identity = None
            self.api.replace_namespaced_lease(self.name, self.namespace, lease)
        except ApiException as err:
            log.warning("Lease %s/%s not released: %s", self.namespace, self.name, err.reason)
            return
        log.info("Lease %s/%s released", self.namespace, self.name)

    @staticmethod
    def _spec(record: LeaderElectionRecord, acquired: datetime, now: datetime):
        return client.V1LeaseSpec(
            holder_identity=record.holder_identity,
            lease_duration_seconds=int(float(record.lease_duration)),
            acquire_time=acquired,
            renew_time=now,
        )


def _text(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment else None


class _Healthy(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (the http.server API)
        self.send_response(200 if self.path.split("?")[0] == "/healthz" else 404)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


class _Probe6(ThreadingHTTPServer):
    address_family = socket.AF_INET6


def lead(settings: OperatorSettings, api: client.ApiClient) -> LeaseLock:
    """Blocks until this replica holds the Lease; meanwhile answers the liveness probe on the
    liveness address and port (a standby is alive). Renewal goes on in a thread; a replica
    that cannot renew within the deadline exits (status 1), as Kubernetes' controllers do."""
    identity = f"{settings.identity}_{os.getpid()}"
    lock = LeaseLock(settings.leader_election, settings.leader_election_namespace, identity, api)
    lease = settings.lease_seconds
    leading = threading.Event()

    def lost() -> None:
        if not lock.released:
            log.error("lost Lease %s/%s: stopping", lock.namespace, lock.name)
            logging.shutdown()
            os._exit(1)

    config = electionconfig.Config(
        lock,
        lease_duration=lease,
        renew_deadline=lease * 2 / 3,
        retry_period=max(1.0, lease / 7.5),
        onstarted_leading=leading.set,
        onstopped_leading=lost,
    )
    logging.getLogger("leaderelection").setLevel(logging.WARNING)  # a line per retry at INFO
    host = settings.liveness_address
    server = _Probe6 if ":" in host else ThreadingHTTPServer
    probe = server((host, settings.liveness_port), _Healthy)
    threading.Thread(target=probe.serve_forever, daemon=True).start()
    log.info("standby: waiting for Lease %s/%s as %s", lock.namespace, lock.name, identity)
    threading.Thread(target=leaderelection.LeaderElection(config).run, daemon=True).start()
    leading.wait()
    probe.shutdown()
    probe.server_close()
    log.info("leading: holding Lease %s/%s as %s", lock.namespace, lock.name, identity)
    return lock
