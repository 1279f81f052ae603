"""`python -m sami_operator`: run the SAMIRun operator (settings from the environment; see
sami_operator.settings). With SAMI_LEADER_ELECTION set, replicas elect the active one on a
Lease (sami_operator.election) and the others wait as standbys."""

from __future__ import annotations

import logging

import kopf

from sami_operator import handlers  # noqa: F401  (registers the handlers)
from sami_operator.settings import from_env


def main() -> None:
    settings = from_env()
    # Kopf's own messages (handler errors, retries) and the operator's, at INFO, on stderr;
    # kopf.run alone configures no logging (the `kopf run` command line does).
    kopf.configure(verbose=False, quiet=False)
    lock = None
    if settings.leader_election:
        from kubernetes import client, config

        from sami_operator.election import lead

        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        lock = lead(settings, client.ApiClient())
    try:
        kopf.run(
            standalone=True,
            clusterwide=not settings.namespaces,
            namespaces=list(settings.namespaces),
            liveness_endpoint=settings.liveness_endpoint,
        )
    finally:
        if lock is not None:
            lock.release()
            logging.shutdown()


if __name__ == "__main__":
    main()
