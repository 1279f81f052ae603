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
    samirun_doc["spec"]["pods"]["default"]["cacheSize"] = "20Gi"
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
            size = "64Gi" if stage.name == "train" else "20Gi"  # examples/samirun.yaml: 64Gi
            cache = next(v for v in pod["volumes"] if v["name"] == "cache")
            assert cache["emptyDir"] == {"sizeLimit": size}
            requests = pod["containers"][0]["resources"]["requests"]
            assert requests["ephemeral-storage"] == size
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


def _worker_pod(run, stage_name: str) -> dict:
    stage = next(s for s in plan(run, "uid") if s.name == stage_name)
    workload = build_children(run, stage, "uid", SETTINGS)[1]
    if workload["kind"] == "PyTorchJob":
        return workload["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    return workload["spec"]["template"]["spec"]


def test_cache_size_limits_the_cache_and_requests_the_disk(samirun_doc):
    del samirun_doc["spec"]["pods"]["train"]["cacheSize"]
    pod = _worker_pod(parse_samirun(samirun_doc), "train")
    assert next(v for v in pod["volumes"] if v["name"] == "cache")["emptyDir"] == {}
    assert "ephemeral-storage" not in pod["containers"][0]["resources"]["requests"]

    # A 70B bfloat16 download (141 GB) and a few export shards in flight.
    samirun_doc["spec"]["pods"]["train"]["cacheSize"] = "160G"
    pod = _worker_pod(parse_samirun(samirun_doc), "train")
    assert next(v for v in pod["volumes"] if v["name"] == "cache")["emptyDir"] == {
        "sizeLimit": "160G"
    }
    resources = pod["containers"][0]["resources"]
    assert resources["requests"] == {"cpu": 32, "memory": "400Gi", "ephemeral-storage": "160G"}
    assert resources["limits"] == {"nvidia.com/gpu": 8}

    # What the pod asks for itself stays as written, a request or a limit alone.
    for part in ("requests", "limits"):
        samirun_doc["spec"]["pods"]["train"]["resources"][part]["ephemeral-storage"] = "500G"
        resources = _worker_pod(parse_samirun(samirun_doc), "train")["containers"][0]["resources"]
        assert resources[part]["ephemeral-storage"] == "500G"
        assert "160G" not in (resources.get("requests", {}).values())
        del samirun_doc["spec"]["pods"]["train"]["resources"][part]["ephemeral-storage"]

    # A pod without resources gets the request alone; spec.pods.default sets it for all.
    samirun_doc["spec"]["pods"]["default"]["cacheSize"] = "20Gi"
    del samirun_doc["spec"]["pods"]["generate"]
    pod = _worker_pod(parse_samirun(samirun_doc), "generate")
    assert pod["containers"][0]["resources"] == {"requests": {"ephemeral-storage": "20Gi"}}
