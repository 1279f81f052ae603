"""Pod Security 'restricted', enforced by a validating admission webhook for the test control plane.

Kubernetes 1.20 predates the Pod Security admission controller (1.23+), so the harness runs
its rules as a webhook: an HTTPS server on loopback (the control plane's serving certificate,
whose names include 127.0.0.1) that the API server calls for every Pod created in a namespace
labelled ``pod-security.kubernetes.io/enforce=restricted``, as the built-in controller
selects namespaces. It checks the Pod Security Standards' restricted profile
(https://kubernetes.io/docs/concepts/security/pod-security-standards/), baseline included:

- no hostNetwork, hostPID, hostIPC, hostPort, hostPath volume, privileged container;
- volume types only configMap, csi, downwardAPI, emptyDir, ephemeral, persistentVolumeClaim,
  projected, secret;
- every container: allowPrivilegeEscalation false, capabilities drop ALL and add nothing but
  NET_BIND_SERVICE, runAsNonRoot true (or the pod's), runAsUser not 0, seccompProfile
  RuntimeDefault or Localhost (or the pod's).

Refusals read like the built-in controller's: ``violates PodSecurity "restricted:latest":
<check> (<detail>), ...``. Not checked (nothing here sets them): AppArmor, SELinux options,
procMount, sysctls, Windows options.
"""

from __future__ import annotations

import base64
import json
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.k8s.controlplane import ControlPlane

LABEL = "pod-security.kubernetes.io/enforce"
NAME = "pod-security-restricted.sami.test"
ALLOWED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}


def violations(pod: dict[str, Any]) -> list[str]:
    """The restricted profile's checks a pod fails, each as '<check> (<detail>)'."""
    spec = pod.get("spec") or {}
    pod_sc = spec.get("securityContext") or {}
    containers = [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]
    found: dict[str, list[str]] = {}

    def fail(check: str, detail: str) -> None:
        found.setdefault(check, []).append(detail)

    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(field):
            fail("host namespaces", f"{field}=true")
    for volume in spec.get("volumes") or []:
        kinds = set(volume) - {"name"}
        if "hostPath" in kinds:
            fail("hostPath volumes", f"volume {volume['name']!r}")
        elif not kinds <= ALLOWED_VOLUMES:
            fail("restricted volume types", f"volume {volume['name']!r} uses {sorted(kinds)}")
    if pod_sc.get("runAsUser") == 0:
        fail("runAsUser=0", "pod must not set runAsUser=0")
    for c in containers:
        name = c["name"]
        sc = c.get("securityContext") or {}
        if sc.get("privileged"):
            fail("privileged", f'container "{name}" must not set securityContext.privileged=true')
        if any(port.get("hostPort") for port in c.get("ports") or []):
            fail("hostPort", f'container "{name}" uses hostPort')
        if sc.get("allowPrivilegeEscalation") is not False:
            fail(
                "allowPrivilegeEscalation != false",
                f'container "{name}" must set securityContext.allowPrivilegeEscalation=false',
            )
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            fail(
                "unrestricted capabilities",
                f'container "{name}" must set securityContext.capabilities.drop=["ALL"]',
            )
        for cap in caps.get("add") or []:
            if cap != "NET_BIND_SERVICE":
                fail(
                    "unrestricted capabilities",
                    f'container "{name}" must not include "{cap}" in '
                    "securityContext.capabilities.add",
                )
        if not sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")):
            fail(
                "runAsNonRoot != true",
                f'pod or container "{name}" must set securityContext.runAsNonRoot=true',
            )
        if sc.get("runAsUser") == 0:
            fail("runAsUser=0", f'container "{name}" must not set runAsUser=0')
        seccomp = (sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            fail(
                "seccompProfile",
                f'pod or container "{name}" must set securityContext.seccompProfile.type to '
                '"RuntimeDefault" or "Localhost"',
            )
    return [f"{check} ({'; '.join(details)})" for check, details in found.items()]


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        review = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        request = review["request"]
        failed = violations(request.get("object") or {})
        response: dict[str, Any] = {"uid": request["uid"], "allowed": not failed}
        if failed:
            response["status"] = {
                "code": 403,
                "reason": "Forbidden",
                "message": f'violates PodSecurity "restricted:latest": {", ".join(failed)}',
            }
        body = json.dumps(
            {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response}
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


class RestrictedWebhook:
    """Serves the webhook and registers it with the control plane until stopped."""

    def __init__(self, control_plane: ControlPlane):
        self.cp = control_plane
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        pki = control_plane.dir / "pki"
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(pki / "apiserver.crt", pki / "apiserver.key")
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.ca = (pki / "ca.crt").read_bytes()
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> RestrictedWebhook:
        self._thread.start()
        port = self.server.server_address[1]
        self.cp.apply(
            {
                "apiVersion": "admissionregistration.k8s.io/v1",
                "kind": "ValidatingWebhookConfiguration",
                "metadata": {"name": NAME},
                "webhooks": [
                    {
                        "name": NAME,
                        "clientConfig": {
                            "url": f"https://127.0.0.1:{port}/validate",
                            "caBundle": base64.b64encode(self.ca).decode(),
                        },
                        "rules": [
                            {
                                "apiGroups": [""],
                                "apiVersions": ["v1"],
                                "operations": ["CREATE"],
                                "resources": ["pods"],
                                "scope": "Namespaced",
                            }
                        ],
                        "namespaceSelector": {"matchLabels": {LABEL: "restricted"}},
                        "admissionReviewVersions": ["v1"],
                        "sideEffects": "None",
                        "failurePolicy": "Fail",
                        "timeoutSeconds": 10,
                    }
                ],
            }
        )
        return self

    def stop(self) -> None:
        self.cp.kubectl("delete", "validatingwebhookconfiguration", NAME, check=False)
        self.server.shutdown()
        self.server.server_close()
