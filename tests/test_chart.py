"""The Helm chart (charts/sami-operator), rendered and linted by the real Helm engine
(helm-python-sdk: Helm's Go SDK as a C library, no helm CLI), then installed on the real
control plane (tests/k8s): the operator runs with the chart's ServiceAccount token only, so a
missing RBAC rule fails the reconcile test.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import EXAMPLES
from tests.k8s.controlplane import ApiError, ControlPlane, free_port

try:
    import helm_python as helm
except ImportError:  # the dev extra installs it; the CRD copy is checked without it
    helm = None

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "sami-operator"
CRD = ROOT / "crds" / "sami.dev_samiruns.yaml"
CRD_COPY = CHART / "files" / "sami.dev_samiruns.yaml"
RBAC_KINDS = {"Role", "ClusterRole"}
NAMESPACED = {"operator": {"watchNamespaces": ["team-a", "team-b", "team-a"]}}
WORKER_POLICY = {
    **NAMESPACED,
    "networkPolicy": {
        "workers": {
            "enabled": True,
            "storage": {"to": [{"ipBlock": {"cidr": "52.216.0.0/15"}}]},
            "judge": {"to": [{"ipBlock": {"cidr": "203.0.113.7/32"}}], "ports": [8443]},
            "extraEgress": [{"to": [{"ipBlock": {"cidr": "198.51.100.0/24"}}]}],
        }
    },
}


@pytest.fixture(scope="module")
def chart() -> Iterator[Any]:
    if helm is None:
        pytest.skip("helm-python-sdk is not installed (pip install -e .[dev])")
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def render(
    chart, values: dict | None = None, name: str = "sami", namespace: str = "sami-system"
) -> list[dict]:
    """Every rendered object (NOTES.txt aside), in template order."""
    out = chart.render(values, name=name, namespace=namespace)
    docs = []
    for template, text in sorted(out.items()):
        if not template.endswith("NOTES.txt"):
            docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def notes(chart, values: dict | None = None) -> str:
    out = chart.render(values, name="sami", namespace="sami-system")
    return out["sami-operator/templates/NOTES.txt"]


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''}"
    return found[0]


def container_env(deployment: dict) -> dict[str, str]:
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value") for e in container["env"]}


# --- files and lint -----------------------------------------------------------------------------


def test_crd_copy_is_byte_identical_to_the_generated_crd():
    assert CRD_COPY.read_bytes() == CRD.read_bytes(), (
        f"{CRD_COPY.relative_to(ROOT)} differs from {CRD.relative_to(ROOT)}: "
        f"cp {CRD.relative_to(ROOT)} {CRD_COPY.relative_to(ROOT)}"
    )


@pytest.mark.parametrize(
    "values", [None, NAMESPACED, WORKER_POLICY], ids=["cluster-wide", "namespaced", "workers"]
)
def test_lint_is_clean(chart, values):
    report = helm.lint(CHART, values, strict=True, namespace="sami-system")
    assert report["errors"] == []
    # Severity 1 is informational (Helm suggests an icon); warnings and errors fail.
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_every_value_is_commented_and_in_the_schema(chart):
    """Every key of values.yaml has a comment line right above it (its help text), except
    inside free-form Kubernetes objects (resources, securityContext, ...), and the schema
    describes exactly the keys values.yaml has."""
    schema = chart.schema
    lines = (CHART / "values.yaml").read_text().splitlines()
    stack: list[tuple[int, str]] = []
    seen = set()
    for i, line in enumerate(lines):
        match = re.match(r"^( *)([A-Za-z][\w.-]*):", line)
        if not match:
            continue
        indent, key = len(match.group(1)), match.group(2)
        stack = [(n, k) for n, k in stack if n < indent] + [(indent, key)]
        path = [k for _, k in stack]
        node = schema
        for part in path:
            node = (node or {}).get("properties", {}).get(part)
        if node is None:
            continue  # inside a free-form object
        seen.add(".".join(path))
        assert lines[i - 1].strip().startswith("#"), f"values.yaml:{i + 1} {'.'.join(path)}"

    def schema_keys(node: dict, prefix: str = "") -> set[str]:
        keys = set()
        for key, sub in node.get("properties", {}).items():
            keys.add(prefix + key)
            keys |= schema_keys(sub, f"{prefix}{key}.")
        return keys

    assert schema_keys(schema) == seen


# --- values.schema.json ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"replica": 2}, "at '': additional properties 'replica' not allowed"),
        ({"replicas": 0}, "at '/replicas': minimum: got 0, want 1"),
        ({"operator": {"leaseSeconds": 1}}, "at '/operator/leaseSeconds': minimum: got 1, want 3"),
        (
            {"operator": {"watchNamespace": ["team-a"]}},
            "at '/operator': additional properties 'watchNamespace' not allowed",
        ),
        (
            {"operator": {"reconcileSeconds": "fast"}},
            "at '/operator/reconcileSeconds': got string, want number",
        ),
        ({"operator": {"watchNamespaces": "team-a"}}, "got string, want array"),
        ({"operator": {"watchNamespaces": ["Team_A"]}}, "/operator/watchNamespaces/0"),
        (
            {"image": {"pullPolicy": "Sometimes"}},
            "at '/image/pullPolicy': value must be one of 'Always', 'IfNotPresent', 'Never'",
        ),
        ({"metrics": {"port": 0}}, "at '/metrics/port': minimum: got 0, want 1"),
        ({"crds": {"keep": "yes"}}, "at '/crds/keep': got string, want boolean"),
        (
            {"operator": {"metricsAddress": "localhost"}},
            "'localhost' is not valid ipv4",
        ),
        ({"operator": {"livenessAddress": ""}}, "at '/operator/livenessAddress'"),
        (
            {"operator": {"defaultStorage": {"url": "s3://b/runs"}}},
            "at '/operator/defaultStorage': additional properties 'url' not allowed",
        ),
    ],
)
def test_schema_rejects_bad_values_with_a_clear_error(chart, values, message):
    with pytest.raises(helm.HelmValuesError) as err:
        chart.validate_schema(values)
    assert message in str(err.value)
    with pytest.raises(helm.HelmValuesError) as err:  # an install checks the same way
        chart.render(values, name="sami", namespace="sami-system")
    assert message in str(err.value)


def test_schema_accepts_the_defaults_and_documented_settings(chart):
    chart.validate_schema(None)
    chart.validate_schema(
        {
            "image": {"digest": "sha256:" + "a" * 64},
            "operator": {"watchNamespaces": ["team-a"], "extraEnv": [{"name": "X", "value": "1"}]},
            "workerServiceAccount": {"annotations": {"eks.amazonaws.com/role-arn": "arn:x"}},
            "metrics": {"serviceMonitor": {"enabled": True, "interval": "15s"}},
        }
    )


# --- what a default install creates -----------------------------------------------------------


def test_default_install(chart):
    docs = render(chart)
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in docs)
    assert kinds == [
        ("ClusterRole", "sami-sami-operator"),
        ("ClusterRole", "sami-sami-operator-edit"),
        ("ClusterRole", "sami-sami-operator-view"),
        ("ClusterRoleBinding", "sami-sami-operator"),
        ("CustomResourceDefinition", "samiruns.sami.dev"),
        ("Deployment", "sami-sami-operator"),
        ("NetworkPolicy", "sami-sami-operator"),
        ("PodDisruptionBudget", "sami-sami-operator"),
        ("Role", "sami-sami-operator-lease"),
        ("RoleBinding", "sami-sami-operator-lease"),
        ("Service", "sami-sami-operator-metrics"),
        ("ServiceAccount", "sami-sami-operator"),
        ("ServiceAccount", "sami-sami-operator-worker"),
    ]
    deployment = one(docs, "Deployment")
    spec = deployment["spec"]
    # An active replica and a standby; a rolling update starts the new pod (a standby) before
    # the old one stops and hands over its Lease.
    assert spec["replicas"] == 2
    assert spec["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    pod = spec["template"]["spec"]
    assert pod["serviceAccountName"] == "sami-sami-operator"
    container = pod["containers"][0]
    assert container["image"] == "ghcr.io/sami-project/sami-operator:0.1.0"
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "healthz"}
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"healthz": 8080, "metrics": 9090}
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    assert container_env(deployment) == {
        "SAMI_WORKER_IMAGE": "ghcr.io/sami-project/sami-worker:0.1.0",
        "SAMI_WORKER_SERVICE_ACCOUNT": "sami-sami-operator-worker",
        "SAMI_NAMESPACES": "",
        "SAMI_RECONCILE_SECONDS": "5",
        "SAMI_CREATES_PER_SECOND": "50",
        "SAMI_LEADER_ELECTION": "sami-sami-operator",
        "SAMI_LEADER_ELECTION_NAMESPACE": "sami-system",
        "SAMI_LEASE_SECONDS": "15",
        "SAMI_POD_NAME": None,  # the pod's name, from the downward API
        "SAMI_PREFIX": "sami.dev",
        "SAMI_PYTHON": "python",
        "SAMI_LIVENESS_PORT": "8080",
        "SAMI_LIVENESS_ADDRESS": "0.0.0.0",
        "SAMI_METRICS_PORT": "9090",
        "SAMI_METRICS_ADDRESS": "0.0.0.0",
    }
    # The selector matches the pod, the Service selects it.
    labels = pod and spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    assert one(docs, "Service")["spec"]["selector"].items() <= labels.items()
    container_spec = pod["containers"][0]
    pod_name = next(e for e in container_spec["env"] if e["name"] == "SAMI_POD_NAME")
    assert pod_name["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    binding = one(docs, "ClusterRoleBinding")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "sami-sami-operator", "namespace": "sami-system"}
    ]
    # The Lease: created by any replica, read and renewed by name only.
    lease = one(docs, "Role", "sami-sami-operator-lease")
    assert lease["metadata"]["namespace"] == "sami-system"
    assert [(r["verbs"], r.get("resourceNames")) for r in lease["rules"]] == [
        (["create"], None),
        (["get", "update"], ["sami-sami-operator"]),
    ]
    assert one(docs, "RoleBinding", "sami-sami-operator-lease")["subjects"] == binding["subjects"]
    # A drain never evicts both replicas at once; one replica gets no budget.
    budget = one(docs, "PodDisruptionBudget")["spec"]
    assert budget["maxUnavailable"] == 1
    assert budget["selector"]["matchLabels"].items() <= labels.items()
    assert not [d for d in render(chart, {"replicas": 1}) if d["kind"] == "PodDisruptionBudget"]
    worker = one(docs, "ServiceAccount", "sami-sami-operator-worker")
    assert worker["automountServiceAccountToken"] is False
    # The worker ServiceAccount holds no role.
    bound = [s["name"] for d in docs if d["kind"].endswith("Binding") for s in d["subjects"]]
    assert "sami-sami-operator-worker" not in bound
    text = notes(chart)
    assert "kubectl -n sami-system rollout status deployment/sami-sami-operator" in text
    assert "kubectl -n sami-system get samiruns -w" in text
    assert "carries the finalizer sami.dev/finalizer" in text
    assert """--type=merge -p '{"metadata":{"finalizers":null}}'""" in text


def test_namespaced_install(chart):
    docs = render(chart, NAMESPACED)
    roles = [
        d for d in docs if d["kind"] == "Role" and not d["metadata"]["name"].endswith("-lease")
    ]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    role_bindings = [
        d
        for d in docs
        if d["kind"] == "RoleBinding" and not d["metadata"]["name"].endswith("-lease")
    ]
    assert sorted(b["metadata"]["namespace"] for b in role_bindings) == ["team-a", "team-b"]
    for binding in role_bindings:
        assert binding["roleRef"]["kind"] == "Role"
        assert binding["subjects"][0]["namespace"] == "sami-system"
    # Cluster-wide only what is cluster-scoped: CRD and Namespace reads.
    scan = one(docs, "ClusterRole", "sami-sami-operator-scan")
    assert {(r["resources"][0], tuple(r["verbs"])) for r in scan["rules"]} == {
        ("customresourcedefinitions", ("list", "watch")),
        ("namespaces", ("list", "watch")),
    }
    with_runs = [d for d in docs if d["kind"] == "ClusterRole" and "samiruns" in json.dumps(d)]
    assert sorted(d["metadata"]["name"] for d in with_runs) == [
        "sami-sami-operator-edit",
        "sami-sami-operator-view",
    ]
    workers = [
        d["metadata"]["namespace"]
        for d in docs
        if d["kind"] == "ServiceAccount" and d["metadata"]["name"].endswith("-worker")
    ]
    assert sorted(workers) == ["sami-system", "team-a", "team-b"]
    assert container_env(one(docs, "Deployment"))["SAMI_NAMESPACES"] == "team-a,team-b"
    assert "kubectl -n team-a get samiruns -w" in notes(chart, NAMESPACED)


@pytest.mark.parametrize("values", [None, NAMESPACED], ids=["cluster-wide", "namespaced"])
def test_no_wildcards_in_rbac(chart, values):
    rules = [r for d in render(chart, values) if d["kind"] in RBAC_KINDS for r in d["rules"]]
    assert rules
    for rule in rules:
        for field in ("apiGroups", "resources", "verbs", "resourceNames", "nonResourceURLs"):
            assert "*" not in rule.get(field, []), rule


def test_every_rbac_rule_says_why():
    """Each rule in the RBAC templates has a comment right above it."""
    for path in (CHART / "templates").glob("*"):
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if line.strip().startswith("- apiGroups:"):
                assert lines[i - 1].strip().startswith("#"), f"{path.name}:{i + 1}"


def test_aggregated_user_roles(chart):
    docs = render(chart)
    view = one(docs, "ClusterRole", "sami-sami-operator-view")
    edit = one(docs, "ClusterRole", "sami-sami-operator-edit")
    agg = "rbac.authorization.k8s.io/aggregate-to-"
    assert {k for k, v in view["metadata"]["labels"].items() if k.startswith(agg)} == {
        agg + "view",
        agg + "edit",
        agg + "admin",
    }
    assert {k for k, v in edit["metadata"]["labels"].items() if k.startswith(agg)} == {
        agg + "edit",
        agg + "admin",
    }
    assert view["rules"][0]["verbs"] == ["get", "list", "watch"]
    assert "create" in edit["rules"][0]["verbs"]
    assert all("samiruns/status" not in r["resources"] for r in edit["rules"])
    assert not any(
        d["metadata"]["name"].endswith(("-view", "-edit"))
        for d in render(chart, {"rbac": {"aggregateToDefaultRoles": False}})
    )


def test_every_container_has_the_security_context(chart):
    values = {"podSecurityContext": {}, "metrics": {"serviceMonitor": {"enabled": True}}}
    for docs in (render(chart), render(chart, NAMESPACED)):
        pods = [d["spec"]["template"]["spec"] for d in docs if d["kind"] == "Deployment"]
        assert pods
        for pod in pods:
            assert pod["securityContext"]["runAsNonRoot"] is True
            containers = pod["containers"] + pod.get("initContainers", [])
            for container in containers:
                sc = container["securityContext"]
                assert sc["runAsNonRoot"] is True
                assert sc["readOnlyRootFilesystem"] is True
                assert sc["allowPrivilegeEscalation"] is False
                assert sc["capabilities"] == {"drop": ["ALL"]}
                assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
                # A read-only root needs a writable /tmp.
                assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
    # The container keeps its own context even when the pod's is emptied.
    pod = one(render(chart, values), "Deployment")["spec"]["template"]["spec"]
    assert pod["containers"][0]["securityContext"]["runAsNonRoot"] is True


def test_rendered_crd_is_the_generated_crd_with_helm_metadata(chart):
    generated = yaml.safe_load(CRD.read_text())
    crd = one(render(chart), "CustomResourceDefinition")
    assert crd["metadata"].pop("annotations") == {"helm.sh/resource-policy": "keep"}
    assert crd["metadata"].pop("labels")["app.kubernetes.io/name"] == "sami-operator"
    assert crd == generated
    unkept = one(render(chart, {"crds": {"keep": False}}), "CustomResourceDefinition")
    assert "annotations" not in unkept["metadata"]
    docs = render(chart, {"crds": {"install": False}})
    assert not [d for d in docs if d["kind"] == "CustomResourceDefinition"]
    assert "kubectl apply --server-side -f crds/" in notes(chart, {"crds": {"install": False}})


def test_metrics_and_service_monitor(chart):
    docs = render(chart, {"metrics": {"enabled": False}})
    assert not [d for d in docs if d["kind"] in ("Service", "ServiceMonitor")]
    assert container_env(one(docs, "Deployment"))["SAMI_METRICS_PORT"] == "0"
    assert not [d for d in render(chart) if d["kind"] == "ServiceMonitor"]
    values = {"metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}}}
    monitor = one(render(chart, values), "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert monitor["spec"]["endpoints"] == [
        {"port": "metrics", "path": "/metrics", "interval": "30s"}
    ]


def test_image_pull_secrets_extra_env_and_digest(chart):
    values = {
        "image": {"digest": "sha256:" + "b" * 64},
        "imagePullSecrets": [{"name": "regcred"}],
        "operator": {"extraEnv": [{"name": "HTTPS_PROXY", "value": "http://proxy:3128"}]},
    }
    deployment = one(render(chart, values), "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["containers"][0]["image"] == "ghcr.io/sami-project/sami-operator@sha256:" + "b" * 64
    assert container_env(deployment)["HTTPS_PROXY"] == "http://proxy:3128"


def test_default_storage_reaches_the_operator_settings(chart):
    from sami_operator.settings import from_env

    storage = {"uri": "s3://runs/sami", "credentialsSecret": "sami-s3", "region": "eu-west-1"}
    env = container_env(one(render(chart, {"operator": {"defaultStorage": storage}}), "Deployment"))
    settings = from_env(env)
    assert settings.default_storage.uri == "s3://runs/sami"
    assert settings.default_storage.credentials.secret_name == "sami-s3"
    assert settings.default_storage.region == "eu-west-1"
    assert settings.default_storage.endpoint_url is None
    assert "SAMI_DEFAULT_STORAGE" not in container_env(one(render(chart), "Deployment"))


# --- NetworkPolicies ------------------------------------------------------------------------------

DNS_PORTS = [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]
KUBE_DNS = {
    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
    "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
}


def test_operator_network_policy(chart):
    docs = render(chart)
    policy = one(docs, "NetworkPolicy")
    spec = policy["spec"]
    assert policy["metadata"]["namespace"] == "sami-system"
    # It selects the operator pod (and, by the Deployment's selector labels, only that).
    deployment = one(docs, "Deployment")["spec"]
    assert spec["podSelector"]["matchLabels"] == deployment["selector"]["matchLabels"]
    assert spec["policyTypes"] == ["Ingress", "Egress"]
    # Ingress: the metrics port, from the release namespace's pods; nothing on the liveness
    # port but the node (always allowed by NetworkPolicy), nothing else.
    assert spec["ingress"] == [
        {"ports": [{"port": 9090, "protocol": "TCP"}], "from": [{"podSelector": {}}]}
    ]
    # Egress: the API server on any address (its IP is cluster-specific), and kube-dns.
    assert spec["egress"] == [
        {"ports": [{"port": 443, "protocol": "TCP"}, {"port": 6443, "protocol": "TCP"}]},
        {"ports": DNS_PORTS, "to": [KUBE_DNS]},
    ]

    prometheus = {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
    }
    nodes = {"ipBlock": {"cidr": "10.0.0.0/16"}}
    values = {
        "metrics": {"port": 9100},
        "operator": {"livenessPort": 8081},
        "networkPolicy": {
            "metricsFrom": [prometheus],
            "livenessFrom": [nodes],
            "apiServer": {"cidrs": ["10.0.0.10/32", "172.20.0.1/32"], "ports": [6443]},
            "dns": {"to": []},
        },
    }
    spec = one(render(chart, values), "NetworkPolicy")["spec"]
    assert spec["ingress"] == [
        {"ports": [{"port": 9100, "protocol": "TCP"}], "from": [prometheus]},
        {"ports": [{"port": 8081, "protocol": "TCP"}], "from": [nodes]},
    ]
    assert spec["egress"] == [
        {
            "ports": [{"port": 6443, "protocol": "TCP"}],
            "to": [{"ipBlock": {"cidr": "10.0.0.10/32"}}, {"ipBlock": {"cidr": "172.20.0.1/32"}}],
        },
        {"ports": DNS_PORTS},  # dns.to empty: port 53 anywhere (NodeLocal DNSCache)
    ]
    # Without metrics there is no ingress rule at all (not an empty one, which allows all).
    spec = one(render(chart, {"metrics": {"enabled": False}}), "NetworkPolicy")["spec"]
    assert spec["ingress"] == [] and "Ingress" in spec["policyTypes"]
    # The notes say who may scrape by default, and not once metricsFrom is set.
    assert "only pods of namespace sami-system scrape its metrics" in notes(chart)
    assert "scrape its metrics" not in notes(chart, values)
    # Off: gone, in both install modes.
    for values in ({}, NAMESPACED):
        off = render(chart, {**values, "networkPolicy": {"enabled": False}})
        assert not [d for d in off if d["kind"] == "NetworkPolicy"]


def test_worker_network_policy(chart):
    from sami_operator.builders import MANAGED_BY

    # Off by default.
    assert [
        d["metadata"]["name"] for d in render(chart, NAMESPACED) if d["kind"] == "NetworkPolicy"
    ] == ["sami-sami-operator"]
    docs = render(chart, WORKER_POLICY)
    policies = [
        d
        for d in docs
        if d["kind"] == "NetworkPolicy" and d["metadata"]["name"].endswith("-worker")
    ]
    # Where the worker ServiceAccount is, and stage pods run.
    assert sorted(p["metadata"]["namespace"] for p in policies) == [
        "sami-system",
        "team-a",
        "team-b",
    ]
    stage_pods = {"matchLabels": {"app.kubernetes.io/managed-by": MANAGED_BY}}
    for policy in policies:
        spec = policy["spec"]
        assert spec["podSelector"] == stage_pods
        assert spec["policyTypes"] == ["Ingress", "Egress"]
        # Only stage pods of the same namespace (no namespaceSelector) connect, on any port.
        assert spec["ingress"] == [{"from": [{"podSelector": stage_pods}]}]
        assert spec["egress"] == [
            {"to": [{"podSelector": stage_pods}]},
            {"ports": DNS_PORTS, "to": [KUBE_DNS]},
            {
                "to": [{"ipBlock": {"cidr": "52.216.0.0/15"}}],
                "ports": [{"port": 443, "protocol": "TCP"}],
            },
            {
                "to": [{"ipBlock": {"cidr": "203.0.113.7/32"}}],
                "ports": [{"port": 8443, "protocol": "TCP"}],
            },
            {"to": [{"ipBlock": {"cidr": "198.51.100.0/24"}}]},
        ]
    assert "connect to each other in their namespace, DNS, the storage, the judge" in notes(
        chart, WORKER_POLICY
    )
    # No judge, no storage given: no rule for them (an empty `to` would allow every address).
    values = {"networkPolicy": {"workers": {"enabled": True}}}
    policy = one(render(chart, values), "NetworkPolicy", "sami-sami-operator-worker")
    assert policy["spec"]["egress"] == [
        {"to": [{"podSelector": stage_pods}]},
        {"ports": DNS_PORTS, "to": [KUBE_DNS]},
    ]
    # The worker policy stands on its own: the operator's can be off.
    values = {"networkPolicy": {"enabled": False, "workers": {"enabled": True}}}
    kinds = [(d["kind"], d["metadata"]["name"]) for d in render(chart, values)]
    assert [k for k in kinds if k[0] == "NetworkPolicy"] == [
        ("NetworkPolicy", "sami-sami-operator-worker")
    ]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"metricsFrom": []}, "at '/networkPolicy/metricsFrom': minItems"),
        ({"apiServer": {"cidrs": ["10.0.0.1"]}}, "at '/networkPolicy/apiServer/cidrs/0'"),
        ({"apiServer": {"ports": ["443"]}}, "got string, want integer"),
        ({"apiServer": {"ports": []}}, "at '/networkPolicy/apiServer/ports': minItems"),
        ({"workers": {"storage": {"cidrs": []}}}, "additional properties 'cidrs' not allowed"),
        ({"workers": {"enabled": "yes"}}, "got string, want boolean"),
    ],
)
def test_schema_checks_network_policy_values(chart, values, message):
    with pytest.raises(helm.HelmValuesError) as err:
        chart.validate_schema({"networkPolicy": values})
    assert message in str(err.value)


def test_worker_annotations_per_namespace(chart):
    arn = "eks.amazonaws.com/role-arn"
    values = {
        **NAMESPACED,
        "workerServiceAccount": {
            "annotations": {arn: "arn:aws:iam::1:role/sami-shared", "team": "platform"},
            "annotationsByNamespace": {
                "team-a": {arn: "arn:aws:iam::1:role/sami-team-a"},
                "team-b": {arn: "arn:aws:iam::1:role/sami-team-b", "team": "b"},
            },
        },
    }
    docs = render(chart, values)
    annotations = {
        d["metadata"]["namespace"]: d["metadata"].get("annotations")
        for d in docs
        if d["kind"] == "ServiceAccount" and d["metadata"]["name"].endswith("-worker")
    }
    assert annotations == {
        "team-a": {arn: "arn:aws:iam::1:role/sami-team-a", "team": "platform"},
        "team-b": {arn: "arn:aws:iam::1:role/sami-team-b", "team": "b"},
        "sami-system": {arn: "arn:aws:iam::1:role/sami-shared", "team": "platform"},
    }
    # The values themselves are not changed by the merge (a later namespace sees the shared).
    assert values["workerServiceAccount"]["annotations"][arn].endswith("sami-shared")
    # Cluster-wide, the release namespace's ServiceAccount takes its own.
    by_release = {"sami-system": {arn: "arn:aws:iam::1:role/sami-system"}}
    worker = one(
        render(chart, {"workerServiceAccount": {"annotationsByNamespace": by_release}}),
        "ServiceAccount",
        "sami-sami-operator-worker",
    )
    assert worker["metadata"]["annotations"] == {arn: "arn:aws:iam::1:role/sami-system"}
    # A namespace without the chart's ServiceAccount is a mistake, not silently ignored.
    with pytest.raises(helm.HelmRenderError, match='creates no worker ServiceAccount in "team-c"'):
        render(chart, {"workerServiceAccount": {"annotationsByNamespace": {"team-c": {}}}})
    with pytest.raises(helm.HelmValuesError, match="invalid propertyName 'Team_A'"):
        chart.validate_schema({"workerServiceAccount": {"annotationsByNamespace": {"Team_A": {}}}})
    with pytest.raises(helm.HelmValuesError, match="want string"):
        chart.validate_schema(
            {"workerServiceAccount": {"annotationsByNamespace": {"team-a": {arn: 1}}}}
        )


def test_bind_addresses_reach_the_operator_settings(chart):
    from sami_operator.settings import from_env

    defaults = from_env(container_env(one(render(chart), "Deployment")))
    assert defaults.metrics_address == "0.0.0.0"
    assert defaults.liveness_endpoint == "http://0.0.0.0:8080/healthz"
    values = {"operator": {"metricsAddress": "127.0.0.1", "livenessAddress": "::"}}
    env = container_env(one(render(chart, values), "Deployment"))
    assert env["SAMI_METRICS_ADDRESS"] == "127.0.0.1"
    assert env["SAMI_LIVENESS_ADDRESS"] == "::"
    settings = from_env(env)
    assert settings.metrics_address == "127.0.0.1"
    assert settings.liveness_endpoint == "http://[::]:8080/healthz"  # IPv6 in brackets


def test_the_operator_binds_its_endpoints_to_the_addresses(chart, monkeypatch):
    """What the chart sets reaches prometheus_client's server and Kopf's liveness endpoint."""
    import kopf
    import prometheus_client

    from sami_operator import __main__ as entry
    from sami_operator import handlers
    from sami_operator.settings import from_env

    values = {"operator": {"metricsAddress": "127.0.0.1", "livenessAddress": "10.1.2.3"}}
    env = container_env(one(render(chart, values), "Deployment"))
    served, ran = [], []

    class Kube:
        """No API server here: what configure asks of kube.Kube, recorded."""

        made: list[dict] = []

        def __init__(self, **limits):
            Kube.made.append(limits)

        def served_launchers(self):
            return frozenset({"Job"})

        def has_per_index_retries(self):
            return False

        def watch(self, namespaces, notify):
            Kube.made.append({"watch": namespaces})

    monkeypatch.setattr(handlers, "_state", {})  # configure fills it; restored afterwards
    monkeypatch.setattr(handlers.kube_module, "Kube", Kube)
    monkeypatch.setattr(
        prometheus_client, "start_http_server", lambda *a, **k: served.append((a, k))
    )
    monkeypatch.setattr(handlers, "SETTINGS", from_env(env))
    asyncio.run(handlers.configure(kopf.OperatorSettings()))
    assert served == [((9090,), {"addr": "127.0.0.1"})]
    # The chart's backpressure setting reaches the client that creates children.
    assert Kube.made == [{"creates_per_second": 50.0}, {"watch": ()}]

    # Without the Lease election (it needs an API server: the failover test in
    # tests/test_operator.py runs it), main goes straight to Kopf.
    env = {k: v for k, v in env.items() if v is not None} | {"SAMI_LEADER_ELECTION": ""}
    monkeypatch.setattr(os, "environ", {**os.environ, **env})
    monkeypatch.setattr(kopf, "run", lambda **kwargs: ran.append(kwargs))
    monkeypatch.setattr(kopf, "configure", lambda **_: None)
    entry.main()
    assert ran[0]["liveness_endpoint"] == "http://10.1.2.3:8080/healthz"


@pytest.mark.parametrize("variable", ["SAMI_METRICS_ADDRESS", "SAMI_LIVENESS_ADDRESS"])
@pytest.mark.parametrize("address", ["localhost", "", "0.0.0.0:9090", "256.0.0.1"])
def test_settings_refuse_a_bind_address_that_is_not_an_ip(variable, address):
    from sami_operator.settings import from_env

    with pytest.raises(ValueError, match=f"^{variable}: .* is not an IP address"):
        from_env({variable: address})
    assert from_env({variable: " 10.1.2.3 "}) == from_env({variable: "10.1.2.3"})


def test_names_fit_in_63_characters(chart):
    release = "a-very-long-release-name-for-a-platform-team-install"  # 52 of Helm's 53
    for values in (None, NAMESPACED, WORKER_POLICY):
        for doc in render(chart, values, name=release):
            assert len(doc["metadata"]["name"]) <= 63, doc["metadata"]["name"]
            assert not doc["metadata"]["name"].endswith("-")


# --- installed on a real API server, run with the chart's ServiceAccount ----------------------


class OperatorProcess:
    """`python -m sami_operator` authenticated only by a ServiceAccount token."""

    def __init__(self, cp: ControlPlane, token: str, env: dict[str, str], workdir: Path):
        self.kubeconfig = workdir / "kubeconfig"
        self.kubeconfig.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [
                        {
                            "name": "test",
                            "cluster": {
                                "server": cp.server,
                                "certificate-authority": str(cp.ca_file),
                            },
                        }
                    ],
                    "users": [{"name": "operator", "user": {"token": token}}],
                    "contexts": [
                        {"name": "test", "context": {"cluster": "test", "user": "operator"}}
                    ],
                    "current-context": "test",
                }
            )
        )
        base = {k: v for k, v in os.environ.items() if not k.startswith(("KUBE", "SAMI_"))}
        self.env = {**base, **env, "KUBECONFIG": str(self.kubeconfig)}
        self.log = workdir / "operator.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> OperatorProcess:
        with self.log.open("wb") as sink:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "sami_operator"],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def walk_stages(cp: ControlPlane, operator: OperatorProcess, ns: str, run: str) -> dict:
    """Finishes the run's first three children one after another, as their controllers
    would (a status patch: this control plane runs no kubelet), waiting each time for the
    operator to create the next child. Returns the first child Job."""
    jobs = f"/apis/batch/v1/namespaces/{ns}/jobs"
    pytorchjobs = f"/apis/kubeflow.org/v1/namespaces/{ns}/pytorchjobs"
    steps = [
        (f"{jobs}/{run}-it0-evaluate", "Complete"),
        (f"{jobs}/{run}-it1-generate", "Complete"),
        (f"{pytorchjobs}/{run}-it1-train", "Succeeded"),
        (f"{jobs}/{run}-it1-evaluate", None),
    ]
    first = None
    # Waits follow progress: a dead operator fails the wait at once (`created`), a live one
    # may take minutes on a loaded machine (its start alone, imports and the first
    # list/watch, takes tens of seconds on 2 busy cores), so the bound is only a backstop.
    # The 1.20 Job controller writes a Job's whole status from its cache (it re-reads the Job
    # only to get a fresh resourceVersion), so a sync racing with the patch below can drop the
    # finished condition again: it is patched until the operator has moved on.
    timeouts = [600] * len(steps)
    finished: list[tuple[str, str]] = []
    with cp.client() as api:

        def finish(path: str, condition: str) -> None:
            try:
                child = api.get(path)
            except ApiError as err:
                if err.status_code == 404:
                    return  # deleted by cleanup.children: the operator saw it finish
                raise
            conditions = (child.get("status") or {}).get("conditions") or []
            if not any(c["type"] == condition and c["status"] == "True" for c in conditions):
                done = {"type": condition, "status": "True", "reason": "TestFinished"}
                api.merge_patch(f"{path}/status", {"status": {"conditions": [done]}})

        def created(path: str) -> dict:
            if operator.proc is None or operator.proc.poll() is not None:
                raise AssertionError(f"the operator exited:\n{operator.output()[-4000:]}")
            for done in finished[-1:]:
                finish(*done)
            return api.get(path)

        for (path, condition), timeout in zip(steps, timeouts, strict=True):
            name = path.rsplit("/", 1)[-1]
            child = cp.wait_for(name, lambda p=path: created(p), timeout=timeout, interval=1.0)
            first = first or child
            if condition:
                finish(path, condition)
                finished.append((path, condition))
    return first


# What the operator logs when RBAC refuses it something: the API server's denial ('User
# "system:serviceaccount:..." cannot create resource ...', also inside Kopf's "Failed to post
# an event" warnings) and Kopf's fallbacks ("Not enough permissions to watch ..."). Other 403s,
# such as writes to a namespace being deleted by an earlier test, are not RBAC's.
PERMISSION_TROUBLE = re.compile(
    r'User \\?"system:serviceaccount:[^"\\]+\\?" cannot|not enough permissions', re.IGNORECASE
)


@pytest.mark.parametrize("mode", ["cluster-wide", "namespaced"])
def test_operator_reconciles_with_only_the_charts_rbac(
    chart, control_plane: ControlPlane, k8s_namespace: str, tmp_path: Path, mode: str
):
    cp, release_ns = control_plane, k8s_namespace
    release = f"t{uuid.uuid4().hex[:6]}"
    run_ns = release_ns
    # The stage pods' NetworkPolicy too: the API server takes both policies (this control plane
    # enforces none, so they change nothing else).
    values: dict[str, Any] = {
        # One replica: no PodDisruptionBudget, whose policy/v1 this 1.20 server predates.
        "replicas": 1,
        "operator": {"reconcileSeconds": 1},
        "networkPolicy": WORKER_POLICY["networkPolicy"],
    }
    if mode == "namespaced":
        run_ns = f"{release}-runs"
        cp.kubectl("create", "namespace", run_ns)
        values["operator"]["watchNamespaces"] = [run_ns]
    docs = render(chart, values, name=release, namespace=release_ns)
    operator = None
    try:
        # `helm install`: the CRD first (kubectl's client-side check does not know
        # x-kubernetes-validations, which a 1.20 server drops), then the rest.
        crd = one(docs, "CustomResourceDefinition")
        cp.kubectl("apply", "--validate=false", "-f", "-", input=json.dumps(crd))
        # Every namespaced object names its namespace (watched namespaces get Roles too).
        rest = [d for d in docs if d["kind"] != "CustomResourceDefinition"]
        cp.apply(rest)
        for policy in (d for d in rest if d["kind"] == "NetworkPolicy"):
            meta = policy["metadata"]
            stored = cp.kubectl_json("get", "networkpolicy", meta["name"], "-n", meta["namespace"])
            assert stored["spec"]["egress"] == policy["spec"]["egress"]

        deployment = one(docs, "Deployment")
        sa = deployment["spec"]["template"]["spec"]["serviceAccountName"]
        token = cp.token_for_service_account(release_ns, sa)
        # Least privilege, as the API server sees it (that it is enough, the run below shows).
        for args in [
            ("get", "secrets", "-n", run_ns),
            ("list", "secrets", "-n", run_ns),
            ("create", "pods", "-n", run_ns),
            ("delete", "pods", "-n", run_ns),
            ("update", "samiruns.sami.dev", "-n", run_ns),
            ("delete", "samiruns.sami.dev", "-n", run_ns),
            ("create", "rolebindings.rbac.authorization.k8s.io", "-n", run_ns),
            ("create", "clusterroles.rbac.authorization.k8s.io"),
        ]:
            can = cp.kubectl("auth", "can-i", *args, token=token, check=False)
            assert can.stdout.strip() == "no", (args, can.stdout, can.stderr)

        # A namespace user, bound to the chart's aggregated edit and view roles (this control
        # plane runs no aggregation controller), creates the run.
        user = "alice"
        cp.apply(
            [{"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": user}}]
            + [
                {
                    "apiVersion": "rbac.authorization.k8s.io/v1",
                    "kind": "RoleBinding",
                    "metadata": {"name": f"{user}-{role}"},
                    "roleRef": {
                        "apiGroup": "rbac.authorization.k8s.io",
                        "kind": "ClusterRole",
                        "name": f"{deployment['metadata']['name']}-{role}",
                    },
                    "subjects": [{"kind": "ServiceAccount", "name": user, "namespace": run_ns}],
                }
                for role in ("edit", "view")
            ],
            namespace=run_ns,
        )
        user_token = cp.token_for_service_account(run_ns, user)
        run = yaml.safe_load((EXAMPLES / "samirun.yaml").read_text())
        assert "serviceAccountName" not in run["spec"]["pods"]["default"]  # the chart's applies
        run["spec"]["cleanup"] = {"children": "delete"}  # uses the delete rules too
        cp.kubectl("apply", "-n", run_ns, "-f", "-", input=json.dumps(run), token=user_token)

        # As the chart sets it, but SAMI_POD_NAME (the downward API's): the host's name. The
        # operator reconciles only once it holds the Lease, with the chart's Lease RBAC.
        env = {k: v for k, v in container_env(deployment).items() if v is not None}
        env.update(SAMI_METRICS_PORT="0", SAMI_LIVENESS_PORT=str(free_port()))
        operator = OperatorProcess(cp, token, env, tmp_path).start()
        name = run["metadata"]["name"]
        try:
            # evaluate-0 and generate-1 are Jobs, train-1 a PyTorchJob (the example's launcher).
            # Marking each finished, as its controller would, makes the operator read its pods
            # and create the next stage: every rule the operator needs is used.
            first = walk_stages(cp, operator, run_ns, name)
            # cleanup.children: delete: each finished child and its ConfigMap go.
            for kind in ("job", "configmap"):
                cp.wait_for(
                    f"{kind} {name}-it0-evaluate to be deleted",
                    lambda k=kind: (
                        cp.kubectl(
                            "get", k, f"{name}-it0-evaluate", "-n", run_ns, check=False
                        ).returncode
                        != 0
                    ),
                    timeout=60,
                )
            status = cp.kubectl_json("get", "samirun", name, "-n", run_ns)["status"]
            reasons = {
                e["reason"]
                for e in cp.kubectl_json("get", "events", "-n", run_ns)["items"]
                if e["involvedObject"]["name"] == name
            }
        except TimeoutError as err:
            raise AssertionError(f"{err}\noperator log:\n{operator.output()[-6000:]}") from None

        assert first["metadata"]["ownerReferences"][0]["name"] == name
        worker_sa = env["SAMI_WORKER_SERVICE_ACCOUNT"]
        assert first["spec"]["template"]["spec"]["serviceAccountName"] == worker_sa
        cp.kubectl("get", "serviceaccount", worker_sa, "-n", run_ns)  # exists where it runs
        assert status["phase"] in ("Pending", "Running"), status
        assert {"StageCreated", "StageSucceeded"} <= reasons
        operator.stop()
        lines = operator.output().splitlines()
        trouble = [line for line in lines if PERMISSION_TROUBLE.search(line)]
        assert trouble == [], "\n".join(trouble)
    finally:
        if operator is not None:
            operator.stop()
        cp.kubectl("delete", "samirun", "--all", "-n", run_ns, "--wait=false", check=False)
        cp.kubectl(
            "delete",
            "clusterrole,clusterrolebinding",
            "-l",
            f"app.kubernetes.io/instance={release}",
            "--wait=false",
            check=False,
        )
        if run_ns != release_ns:
            cp.kubectl("delete", "namespace", run_ns, "--wait=false", check=False)
