"""pytest fixtures for the real Kubernetes 1.20 control plane (see tests/k8s/__init__.py).

- ``control_plane`` (session): a started ``ControlPlane`` with the CRDs of crds/ and the
  PyTorchJob, JobSet and TrainJob stand-ins already installed (failures in
  ``control_plane.crd_errors``).
  Builds the binaries with scripts/kube-build.sh when they are missing; skips only when they are
  missing and cannot be built here (no apt-get, or neither root nor passwordless sudo).
- ``k8s_namespace`` (function): a fresh namespace (its default ServiceAccount token ready, so pods
  can be created), deleted after the test without waiting.
- ``kubelet`` (session): a ``LocalKubelet`` running pods of every non-system namespace.
- ``pytorchjob_controller`` (session): the PyTorchJob CRD stand-in installed and an emulated
  Kubeflow PyTorchJob controller running (tests/k8s/training_operators.py).
- ``trainjob_controller`` (session): the TrainJob and ClusterTrainingRuntime CRD stand-ins
  installed and an emulated Kubeflow Trainer TrainJob controller running; it creates JobSets,
  so the ``jobset_controller`` runs too.
- ``jobset_controller`` (session): the JobSet CRD stand-in installed and an emulated JobSet
  controller running (tests/k8s/training_operators.py).
- ``restricted_admission`` (session): Pod Security 'restricted' enforced on namespaces labelled
  ``pod-security.kubernetes.io/enforce=restricted`` by a webhook (tests/k8s/admission.py).

Tests using any of these get the ``k8s`` marker automatically.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator

import pytest

from tests.k8s.admission import RestrictedWebhook
from tests.k8s.controlplane import (
    BUILD_SCRIPT,
    ROOT,
    ControlPlane,
    binaries_present,
    cache_dir,
)
from tests.k8s.kubelet import LocalKubelet
from tests.k8s.training_operators import (
    JOBSET_CRD,
    PYTORCHJOB_CRD,
    TRAINJOB_CRD,
    JobSetController,
    PyTorchJobController,
    TrainJobController,
)

K8S_FIXTURES = {
    "control_plane",
    "k8s_namespace",
    "kubelet",
    "pytorchjob_controller",
    "trainjob_controller",
    "jobset_controller",
    "restricted_admission",
}


def _can_build() -> str | None:
    """None if kube-build.sh can run here, else why not."""
    if shutil.which("apt-get") is None:
        return "no apt-get (kube-build.sh needs Debian's kubernetes source and etcd-server)"
    if os.geteuid() != 0:
        sudo = shutil.which("sudo")
        if sudo is None or subprocess.run([sudo, "-n", "true"], capture_output=True).returncode:
            return "not root and no passwordless sudo to install packages"
    return None


def ensure_binaries() -> None:
    """Runs scripts/kube-build.sh: under a second when its cache is complete, else it builds."""
    proc = subprocess.run(
        ["bash", str(BUILD_SCRIPT)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
    )
    if proc.returncode == 0 and binaries_present():
        return
    why_not = _can_build()
    if why_not and not binaries_present():
        pytest.skip(
            f"Kubernetes 1.20 binaries absent in {cache_dir()} and cannot be built: {why_not}"
        )
    pytest.fail(
        f"scripts/kube-build.sh failed ({proc.returncode}):\n{proc.stderr[-5000:]}",
        pytrace=False,
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if K8S_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.k8s)


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    ensure_binaries()
    # The project's CRDs and the training-operator stand-ins go in before the
    # controller-manager starts, so garbage collection of their children is immediate.
    crds = sorted((ROOT / "crds").glob("*.yaml")) + [PYTORCHJOB_CRD, JOBSET_CRD, TRAINJOB_CRD]
    cp = ControlPlane(crds=crds).start(tmp_path_factory.mktemp("k8s"))
    try:
        yield cp
    finally:
        cp.stop()


@pytest.fixture(scope="session")
def kubelet(
    control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalKubelet]:
    kl = LocalKubelet(control_plane, tmp_path_factory.mktemp("kubelet")).start()
    try:
        yield kl
    finally:
        kl.stop()


@pytest.fixture(scope="session")
def pytorchjob_controller(control_plane: ControlPlane) -> Iterator[PyTorchJobController]:
    controller = PyTorchJobController(control_plane).start()
    try:
        yield controller
    finally:
        controller.stop()


@pytest.fixture(scope="session")
def trainjob_controller(
    control_plane: ControlPlane, jobset_controller: JobSetController
) -> Iterator[TrainJobController]:
    controller = TrainJobController(control_plane).start()
    try:
        yield controller
    finally:
        controller.stop()


@pytest.fixture(scope="session")
def jobset_controller(control_plane: ControlPlane) -> Iterator[JobSetController]:
    controller = JobSetController(control_plane).start()
    try:
        yield controller
    finally:
        controller.stop()


@pytest.fixture(scope="session")
def restricted_admission(control_plane: ControlPlane) -> Iterator[RestrictedWebhook]:
    webhook = RestrictedWebhook(control_plane).start()
    try:
        yield webhook
    finally:
        webhook.stop()


@pytest.fixture
def k8s_namespace(control_plane: ControlPlane, request: pytest.FixtureRequest) -> Iterator[str]:
    base = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    name = f"{base or 't'}-{uuid.uuid4().hex[:6]}"
    control_plane.kubectl("create", "namespace", name)
    control_plane.kubectl("label", "namespace", name, "sami.dev/test=true")
    # Pods need the default ServiceAccount and its token (ServiceAccount admission in 1.20).
    control_plane.token_for_service_account(name, "default")
    try:
        yield name
    finally:
        control_plane.kubectl("delete", "namespace", name, "--wait=false", check=False)
