"""Every object the operator's builders produce is accepted by a real kube-apiserver:
`kubectl create --dry-run=server`, with kubectl's schema validation (unknown or mistyped
fields of a Job or ConfigMap fail it) and the server's admission and defaulting."""

from __future__ import annotations

import json

import pytest

from sami_operator.builders import build_children
from sami_operator.planner import cleanup_stage, plan
from sami_operator.settings import OperatorSettings
from sami_operator.validate import parse_samirun

SETTINGS = OperatorSettings(
    worker_image="registry.example/sami-worker:test", worker_service_account="sami-worker"
)


def run_with(samirun_doc, namespace: str, launcher: str, writer: bool = False):
    samirun_doc["metadata"]["namespace"] = namespace
    samirun_doc["spec"]["training"]["launcher"] = launcher
    samirun_doc["spec"]["training"]["nodes"] = 1 if launcher == "Job" else 2
    if writer:
        samirun_doc["spec"]["principles"] = {
            "writer": {"model": "s3://models/writer", "instruction": "Be good."}
        }
    return parse_samirun(samirun_doc)


def dry_run(cp, objects: list[dict], namespace: str) -> list[dict]:
    """What the API server would store; raises when it or kubectl's validation refuses."""
    manifest = json.dumps({"apiVersion": "v1", "kind": "List", "items": objects})
    args = ["create", "--dry-run=server", "--validate=true", "-n", namespace, "-o", "json"]
    out = cp.kubectl(*args, "-f", "-", input=manifest).stdout
    decoder, stored, at = json.JSONDecoder(), [], 0
    while out[at:].strip():  # one JSON document per object, back to back
        obj, end = decoder.raw_decode(out[at:].lstrip())
        at = len(out) - len(out[at:].lstrip()) + end
        stored.append(obj)
    return stored


@pytest.mark.parametrize("launcher", ["PyTorchJob", "JobSet", "Job"])
def test_every_stage_is_accepted_by_the_api_server(
    control_plane, k8s_namespace, samirun_doc, launcher
):
    run = run_with(samirun_doc, k8s_namespace, launcher, writer=True)
    stages = plan(run, "0b1c2d3e-uid") + [cleanup_stage(run, "0b1c2d3e-uid")]
    assert [s.name for s in stages][:3] == ["principles", "evaluate", "generate"]
    for stage in stages:
        objects = build_children(run, stage, "0b1c2d3e-uid", SETTINGS, attempt=2)
        stored = dry_run(control_plane, objects, k8s_namespace)
        assert [o["kind"] for o in stored] == [o["kind"] for o in objects], stage.id
        workload = stored[1]
        assert workload["metadata"]["name"].endswith("-r2")
        assert workload["metadata"]["ownerReferences"][0]["kind"] == "SAMIRun"
        if workload["kind"] == "Job":
            pod = workload["spec"]["template"]["spec"]
            # The server kept what matters (nothing pruned as unknown) and defaulted the rest.
            assert pod["restartPolicy"] == "Never" and workload["spec"]["backoffLimit"] == 0
            assert {v["name"] for v in pod["volumes"]} >= {"task", "dshm", "cache"}
            assert pod["serviceAccountName"] == "sami-worker"
            assert pod["containers"][0]["terminationMessagePolicy"] == "FallbackToLogsOnError"
            assert pod["containers"][0]["imagePullPolicy"] == "IfNotPresent"  # defaulted


def test_an_invalid_object_is_refused(control_plane, k8s_namespace, samirun_doc):
    """The check above can fail: a misspelt field in a Job is refused by validation."""
    run = run_with(samirun_doc, k8s_namespace, "Job")
    config_map, job = build_children(run, plan(run, "uid")[0], "uid", SETTINGS)
    job["spec"]["template"]["spec"]["restartPolicyy"] = "Never"
    with pytest.raises(Exception, match="restartPolicyy"):
        dry_run(control_plane, [config_map, job], k8s_namespace)
