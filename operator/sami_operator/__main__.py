"""`python -m sami_operator`: run the SAMIRun operator (settings from the environment; see
sami_operator.settings). One replica: Kopf has no leader election."""

from __future__ import annotations

import kopf

from sami_operator import handlers  # noqa: F401  (registers the handlers)
from sami_operator.settings import from_env


def main() -> None:
    settings = from_env()
    # Kopf's own messages (handler errors, retries) and the operator's, at INFO, on stderr;
    # kopf.run alone configures no logging (the `kopf run` command line does).
    kopf.configure(verbose=False, quiet=False)
    kopf.run(
        standalone=True,
        clusterwide=not settings.namespaces,
        namespaces=list(settings.namespaces),
        liveness_endpoint=settings.liveness_endpoint,
    )


if __name__ == "__main__":
    main()
