"""The workloads a stage can run as, in one table: what builders.py builds and kube.py creates,
lists, deletes and reads.

Each entry says a workload's API (group, version, plural), which pods speak for it (the
label selector of its pods, rank 0 first when sorted by name: its exit code and termination
message become the stage's), and how its status conditions map to succeeded, failed and
suspended (whether an unfinished one runs, its pods say: kube.Kube._unfinished). Adding a
launcher is one entry here, its value in models.Launcher and its builder in builders.py
(builders.TRAINING_WORKLOADS). The two modules do not import each other: kube.py reads this
table, reconcile.py the builders.

A batch/v1 Job runs every stage but training, and training with `launcher: Job`; kube.py reads
a Job's own status fields (kube.Kube._job_state), so its condition fields here only document it.
"""

from __future__ import annotations

from dataclasses import dataclass

from sami_operator.models import Launcher


@dataclass(frozen=True)
class Workload:
    launcher: Launcher
    kind: str
    group: str
    version: str
    plural: str
    # The label selector of the pods that speak for a workload named {name}.
    pod_selector: str
    # Condition types whose status "True" means each phase.
    succeeded: tuple[str, ...]
    failed: tuple[str, ...] = ("Failed",)
    suspended: tuple[str, ...] = ("Suspended",)

    @property
    def api(self) -> tuple[str, str, str]:
        return (self.group, self.version, self.plural)

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}"

    @property
    def custom(self) -> bool:
        """A custom resource (kube.Kube reaches it through CustomObjectsApi)."""
        return self.group != "batch"


JOB = Workload(
    launcher=Launcher.job,
    kind="Job",
    group="batch",
    version="v1",
    plural="jobs",
    pod_selector="job-name={name}",
    succeeded=("Complete",),
    suspended=(),  # spec.suspend, read by kube.Kube._job_state
)

# Kubeflow Training Operator v1: https://www.kubeflow.org/docs/components/trainer/legacy-v1/
# All the job's pods: the master, rank 0, sorts first (<name>-master-0, <name>-worker-<i>).
PYTORCHJOB = Workload(
    launcher=Launcher.pytorchjob,
    kind="PyTorchJob",
    group="kubeflow.org",
    version="v1",
    plural="pytorchjobs",
    pod_selector="training.kubeflow.org/job-name={name}",
    succeeded=("Succeeded",),
)

# JobSet (https://jobset.sigs.k8s.io): pods of all its Jobs, <name>-node-0-0 first.
JOBSET = Workload(
    launcher=Launcher.jobset,
    kind="JobSet",
    group="jobset.x-k8s.io",
    version="v1alpha2",
    plural="jobsets",
    pod_selector="jobset.sigs.k8s.io/jobset-name={name}",
    succeeded=("Completed",),
)

# Kubeflow Trainer v2 (trainer.kubeflow.org/v1alpha1, API of release v2.3): the TrainJob
# controller creates a JobSet of the TrainJob's name from the referenced runtime, whose trainer
# Job is the replicated Job "node" (an Indexed Job of numNodes pods, rank 0 the pod of
# completion index 0, <name>-node-0-0-<suffix>). Its conditions are Complete and Failed (copied
# from the JobSet's Completed and Failed) and Suspended. Initializer Jobs, if the runtime has
# any, are left out.
TRAINJOB = Workload(
    launcher=Launcher.trainjob,
    kind="TrainJob",
    group="trainer.kubeflow.org",
    version="v1alpha1",
    plural="trainjobs",
    pod_selector="jobset.sigs.k8s.io/jobset-name={name},jobset.sigs.k8s.io/replicatedjob-name=node",
    succeeded=("Complete",),
)

LAUNCHERS: dict[Launcher, Workload] = {w.launcher: w for w in (PYTORCHJOB, JOBSET, TRAINJOB, JOB)}
BY_KIND: dict[str, Workload] = {w.kind: w for w in LAUNCHERS.values()}
CUSTOM: tuple[Workload, ...] = tuple(w for w in LAUNCHERS.values() if w.custom)
