"""A real Kubernetes 1.20 control plane on loopback: etcd, kube-apiserver, kube-controller-manager.

The binaries come from ``scripts/kube-build.sh`` (Debian's ``kubernetes`` source package, cached in
``${SAMI_CACHE_DIR:-~/.cache/sami}/kube-1.20/bin``) and Debian's ``etcd-server``. See
shared/testing/REAL-COMPONENTS.md ("Kubernetes control plane").

What runs:
- etcd on two free loopback ports, data under ``<tmpdir>/etcd``;
- kube-apiserver on a free loopback secure port (no insecure port) with a generated CA and serving
  certificate, a static admin token (user ``sami-admin`` in ``system:masters``), RBAC
  authorization, service-account signing keys and the admission plugins that need no nodes
  (ResourceQuota and ValidatingAdmissionWebhook among them);
- kube-controller-manager with the job, garbagecollector, namespace, serviceaccount,
  serviceaccount-token and resourcequota controllers (so Jobs create Pods, ownerReferences
  cascade, namespaces finalize, every ServiceAccount gets a token Secret and quotas count).

There is no scheduler and no kubelet: Pods stay Pending unless ``tests.k8s.kubelet.LocalKubelet``
runs them. Each process logs to ``<tmpdir>/<name>.log``.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = ROOT / "scripts" / "kube-build.sh"
SERVICE_CLUSTER_IP_RANGE = "10.0.0.0/24"
ADMIN_USER = "sami-admin"


def cache_dir() -> Path:
    return Path(os.environ.get("SAMI_CACHE_DIR") or Path.home() / ".cache" / "sami") / "kube-1.20"


def bin_dir() -> Path:
    return cache_dir() / "bin"


def binaries_present() -> bool:
    d = bin_dir()
    return (
        (cache_dir() / ".complete").is_file()
        and os.access(d / "kube-apiserver", os.X_OK)
        and os.access(d / "kube-controller-manager", os.X_OK)
        and shutil.which("etcd") is not None
        and find_kubectl() is not None
    )


def find_kubectl() -> str | None:
    """$SAMI_KUBECTL, else the kubectl 1.20 kube-build.sh built (if any), else kubectl on PATH."""
    if os.environ.get("SAMI_KUBECTL"):
        return os.environ["SAMI_KUBECTL"]
    built = bin_dir() / "kubectl"
    if os.access(built, os.X_OK):
        return str(built)
    return shutil.which("kubectl")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"(no {path})"
    return "\n".join(text[-lines:])


class KubectlError(RuntimeError):
    def __init__(self, args: Sequence[str], proc: subprocess.CompletedProcess):
        self.returncode = proc.returncode
        self.stdout = proc.stdout
        self.stderr = proc.stderr
        super().__init__(
            f"kubectl {' '.join(args)} exited {proc.returncode}\n"
            f"stderr: {proc.stderr.strip()}\nstdout: {proc.stdout.strip()[:2000]}"
        )


class ApiError(RuntimeError):
    def __init__(self, response: httpx.Response):
        self.status_code = response.status_code
        try:
            self.body = response.json()
        except ValueError:
            self.body = {"message": response.text}
        message = self.body.get("message", response.text) if isinstance(self.body, dict) else ""
        super().__init__(
            f"{response.request.method} {response.request.url.path} -> "
            f"{response.status_code}: {message}"
        )


class KubeClient:
    """A minimal JSON client for the API server (httpx; one instance per thread is safest).

    Paths are API paths such as ``/api/v1/namespaces/ns/pods``.
    """

    def __init__(self, server: str, token: str, ca_file: Path | str, timeout: float = 30.0):
        self.server = server
        self._http = httpx.Client(
            base_url=server,
            verify=ssl.create_default_context(cafile=str(ca_file)),
            headers={"Authorization": f"Bearer {token}"},
            timeout=timeout,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> KubeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        params: dict | None = None,
        content_type: str = "application/json",
    ) -> dict:
        kwargs: dict[str, Any] = {"params": params}
        if body is not None:
            kwargs["content"] = json.dumps(body)
            kwargs["headers"] = {"Content-Type": content_type}
        response = self._http.request(method, path, **kwargs)
        if response.status_code >= 400:
            raise ApiError(response)
        return response.json() if response.content else {}

    def get(self, path: str, **params: Any) -> dict:
        return self.request("GET", path, params=params or None)

    def create(self, path: str, body: dict) -> dict:
        return self.request("POST", path, body)

    def merge_patch(self, path: str, body: dict) -> dict:
        return self.request("PATCH", path, body, content_type="application/merge-patch+json")

    def delete(self, path: str, **options: Any) -> dict:
        return self.request("DELETE", path, options or None)

    def watch(self, path: str, timeout_seconds: int = 30, **params: Any) -> Iterator[dict]:
        """Yields watch events ({"type", "object"}) until the server ends the watch."""
        params = {"watch": "true", "timeoutSeconds": timeout_seconds, **params}
        with self._http.stream(
            "GET", path, params=params, timeout=timeout_seconds + 10
        ) as response:
            if response.status_code >= 400:
                response.read()
                raise ApiError(response)
            for line in response.iter_lines():
                if line.strip():
                    yield json.loads(line)


class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager on loopback, for tests.

    >>> cp = ControlPlane().start(tmp_path)
    >>> cp.kubectl("get", "namespaces")
    >>> cp.stop()
    """

    def __init__(
        self,
        bin_dir_: Path | None = None,
        etcd: str | None = None,
        crds: Sequence[Path | str] = (),
    ):
        """`crds`: CRD manifests installed before the controller-manager starts, so that its
        garbage collector watches their kinds from the start (Kubernetes 1.20 rediscovers new
        resource types only every 30 s: an owner of a kind that appears later is collected
        up to ~40 s late). A CRD that fails to install is recorded in `crd_errors`."""
        self.bin_dir = Path(bin_dir_) if bin_dir_ else bin_dir()
        self.crds = [Path(c) for c in crds]
        self.crd_errors: dict[str, str] = {}
        self.etcd_bin = etcd or shutil.which("etcd") or "/usr/bin/etcd"
        self.kubectl_bin = find_kubectl()
        self.dir: Path | None = None
        self.server = ""
        self.port = 0
        self.admin_token = ""
        self.kubeconfig: Path | None = None
        self.ca_file: Path | None = None
        self._procs: dict[str, subprocess.Popen] = {}
        self._logs: dict[str, Path] = {}

    # ----------------------------------------------------------------------------- lifecycle
    def start(self, tmpdir: Path | str, timeout: float = 90.0) -> ControlPlane:
        self.dir = Path(tmpdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        for b in ("kube-apiserver", "kube-controller-manager"):
            if not os.access(self.bin_dir / b, os.X_OK):
                raise FileNotFoundError(f"{self.bin_dir / b} missing: run scripts/kube-build.sh")
        if self.kubectl_bin is None:
            raise FileNotFoundError("no kubectl on PATH or in the kube-1.20 cache")
        deadline = time.monotonic() + timeout
        atexit.register(self.stop)  # no stray processes even if the caller never stops us
        try:
            self._write_pki()
            self._start_etcd(deadline)
            self._start_apiserver(deadline)
            self._install_crds()
            self._start_controller_manager(deadline)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """SIGTERM each process group (newest first), then SIGKILL what is left after 10 s."""
        for name in reversed(list(self._procs)):
            proc = self._procs[name]
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for name in reversed(list(self._procs)):
            proc = self._procs[name]
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
            # Children of the group, if any, go too.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        self._procs.clear()

    def __enter__(self) -> ControlPlane:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------------------ helpers
    def client(self, token: str | None = None) -> KubeClient:
        """A new KubeClient (admin unless a token is given); close it when done."""
        assert self.ca_file is not None
        return KubeClient(self.server, token or self.admin_token, self.ca_file)

    def kubectl(
        self,
        *args: str,
        input: str | None = None,
        token: str | None = None,
        check: bool = True,
        timeout: float = 60.0,
    ) -> subprocess.CompletedProcess:
        """Runs kubectl against this control plane (as admin, or with `token`)."""
        cmd = [str(self.kubectl_bin), f"--kubeconfig={self.kubeconfig}"]
        if token is not None:
            cmd.append(f"--token={token}")
        cmd += list(args)
        proc = subprocess.run(
            cmd, input=input, capture_output=True, text=True, timeout=timeout, env=self._env()
        )
        if check and proc.returncode != 0:
            raise KubectlError(args, proc)
        return proc

    def kubectl_json(self, *args: str, token: str | None = None) -> dict:
        return json.loads(self.kubectl(*args, "-o", "json", token=token).stdout)

    def apply(self, manifest: str | dict | list, namespace: str | None = None) -> str:
        """`kubectl apply -f -` for YAML text, a dict or a list of dicts."""
        if not isinstance(manifest, str):
            docs = manifest if isinstance(manifest, list) else [manifest]
            manifest = json.dumps({"apiVersion": "v1", "kind": "List", "items": docs})
        args = ["apply", "-f", "-"] + (["-n", namespace] if namespace else [])
        return self.kubectl(*args, input=manifest).stdout

    def token_for_service_account(self, namespace: str, name: str, timeout: float = 30.0) -> str:
        """The bearer token of a ServiceAccount.

        Kubernetes 1.20: the controller-manager's token controller creates a
        kubernetes.io/service-account-token Secret for each ServiceAccount and lists it in
        `.secrets`; this waits for it and decodes its `token`.
        """
        deadline = time.monotonic() + timeout
        base = f"/api/v1/namespaces/{namespace}"
        with self.client() as api:
            while True:
                with contextlib.suppress(ApiError):
                    sa = api.get(f"{base}/serviceaccounts/{name}")
                    for ref in sa.get("secrets") or []:
                        secret = api.get(f"{base}/secrets/{ref['name']}")
                        token = (secret.get("data") or {}).get("token")
                        if secret.get("type") == "kubernetes.io/service-account-token" and token:
                            return base64.b64decode(token).decode()
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"no token Secret for ServiceAccount {namespace}/{name} after {timeout} s"
                        f"\n{self.log_tails()}"
                    )
                time.sleep(0.2)

    def wait_for(self, what: str, predicate, timeout: float = 30.0, interval: float = 0.2):
        """Polls predicate() until it returns a truthy value; TimeoutError names `what`."""
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            try:
                value = predicate()
            except (ApiError, KubectlError) as e:
                last_error, value = e, None
            if value:
                return value
            time.sleep(interval)
        raise TimeoutError(f"timed out after {timeout} s waiting for {what} ({last_error})")

    def log_tails(self, lines: int = 30) -> str:
        parts = []
        for name, path in self._logs.items():
            proc = self._procs.get(name)
            state = "running" if proc and proc.poll() is None else f"exited {proc and proc.poll()}"
            parts.append(f"--- {name} ({state}), last lines of {path}:\n{tail(path, lines)}")
        return "\n".join(parts)

    # ----------------------------------------------------------------------------- internals
    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KUBE")}
        env["KUBECONFIG"] = str(self.kubeconfig)
        env.setdefault("HOME", str(self.dir))
        return env

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        assert self.dir is not None
        log = self.dir / f"{name}.log"
        self._logs[name] = log
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=self.dir,
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.dir)},
            )
        self._procs[name] = proc
        return proc

    def _check_alive(self, name: str) -> None:
        proc = self._procs[name]
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}\n{self.log_tails()}")

    def _write_pki(self) -> None:
        assert self.dir is not None
        pki = self.dir / "pki"
        pki.mkdir(exist_ok=True)

        def openssl(command: str) -> None:
            subprocess.run(["openssl", *command.split()], check=True, capture_output=True, cwd=pki)

        # A CA, a serving certificate it signs (loopback and the in-cluster service names),
        # and the service-account signing key pair.
        (pki / "ext.cnf").write_text(
            "basicConstraints=CA:FALSE\n"
            "keyUsage=digitalSignature,keyEncipherment\n"
            "extendedKeyUsage=serverAuth\n"
            "subjectAltName=IP:127.0.0.1,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,"
            "DNS:kubernetes.default,DNS:kubernetes.default.svc,"
            "DNS:kubernetes.default.svc.cluster.local\n"
        )
        openssl("genrsa -out ca.key 2048")
        openssl("req -x509 -new -key ca.key -days 30 -subj /CN=sami-test-ca -out ca.crt")
        openssl("genrsa -out apiserver.key 2048")
        openssl("req -new -key apiserver.key -subj /CN=kube-apiserver -out apiserver.csr")
        openssl(
            "x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 30"
            " -extfile ext.cnf -out apiserver.crt"
        )
        openssl("genrsa -out sa.key 2048")
        openssl("rsa -in sa.key -pubout -out sa.pub")
        self.ca_file = pki / "ca.crt"
        self.admin_token = base64.b32encode(os.urandom(20)).decode().lower()
        (pki / "tokens.csv").write_text(
            f'{self.admin_token},{ADMIN_USER},{ADMIN_USER},"system:masters"\n'
        )

    def _start_etcd(self, deadline: float) -> None:
        assert self.dir is not None
        client_port, peer_port = free_port(), free_port()
        self.etcd_url = f"http://127.0.0.1:{client_port}"
        peer = f"http://127.0.0.1:{peer_port}"
        self._spawn(
            "etcd",
            [
                self.etcd_bin,
                "--name=sami-test",
                f"--data-dir={self.dir / 'etcd'}",
                f"--listen-client-urls={self.etcd_url}",
                f"--advertise-client-urls={self.etcd_url}",
                f"--listen-peer-urls={peer}",
                f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster=sami-test={peer}",
                "--initial-cluster-state=new",
                "--log-level=warn",
                "--logger=zap",
            ],
        )
        while True:
            self._check_alive("etcd")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.etcd_url}/health", timeout=2).json().get("health") == "true":
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"etcd not healthy in time\n{self.log_tails()}")
            time.sleep(0.1)

    def _start_apiserver(self, deadline: float) -> None:
        assert self.dir is not None
        pki = self.dir / "pki"
        self.port = free_port()
        self.server = f"https://127.0.0.1:{self.port}"
        self._spawn(
            "kube-apiserver",
            [
                str(self.bin_dir / "kube-apiserver"),
                f"--etcd-servers={self.etcd_url}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={self.port}",
                "--insecure-port=0",
                f"--cert-dir={pki}",
                f"--tls-cert-file={pki / 'apiserver.crt'}",
                f"--tls-private-key-file={pki / 'apiserver.key'}",
                f"--client-ca-file={pki / 'ca.crt'}",
                f"--token-auth-file={pki / 'tokens.csv'}",
                "--authorization-mode=RBAC",
                f"--service-account-key-file={pki / 'sa.pub'}",
                f"--service-account-signing-key-file={pki / 'sa.key'}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                "--api-audiences=https://kubernetes.default.svc.cluster.local",
                f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
                # Plugins that need no nodes; ServiceAccount mounts the SA token Secret.
                # Validating webhooks do nothing until a test registers one (tests/k8s/
                # admission.py enforces Pod Security 'restricted' that way).
                "--enable-admission-plugins=NamespaceLifecycle,LimitRanger,ServiceAccount,"
                "DefaultTolerationSeconds,Priority,ResourceQuota,ValidatingAdmissionWebhook",
                "--disable-admission-plugins=DefaultStorageClass,StorageObjectInUseProtection,"
                "PersistentVolumeClaimResize,RuntimeClass,TaintNodesByCondition,"
                "CertificateApproval,CertificateSigning,CertificateSubjectRestriction,"
                "DefaultIngressClass,MutatingAdmissionWebhook",
                # The "kubernetes" Service's endpoints would be 127.0.0.1, which validation
                # rejects (loopback): do not reconcile them.
                "--endpoint-reconciler-type=none",
                "--allow-privileged=true",
                "--profiling=false",
                "--v=1",
            ],
        )
        self.kubeconfig = self.dir / "kubeconfig"
        self.kubeconfig.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [
                        {
                            "name": "sami-test",
                            "cluster": {
                                "server": self.server,
                                "certificate-authority": str(self.ca_file),
                            },
                        }
                    ],
                    "users": [{"name": ADMIN_USER, "user": {"token": self.admin_token}}],
                    "contexts": [
                        {
                            "name": "sami-test",
                            "context": {"cluster": "sami-test", "user": ADMIN_USER},
                        }
                    ],
                    "current-context": "sami-test",
                },
                indent=2,
            )
        )
        last = ""
        with self.client() as api:
            while True:
                self._check_alive("kube-apiserver")
                try:
                    r = api._http.get("/readyz")
                    if r.status_code == 200:
                        return
                    last = f"/readyz {r.status_code}: {r.text[-500:]}"
                except httpx.HTTPError as e:
                    last = repr(e)
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"kube-apiserver not ready in time ({last})\n{self.log_tails()}"
                    )
                time.sleep(0.2)

    def _install_crds(self) -> None:
        names = []
        for path in self.crds:
            # --validate=false: kubectl's client-side schema check knows 1.20's CRD schema only
            # and rejects newer fields (x-kubernetes-validations), which the server drops.
            proc = self.kubectl("apply", "--validate=false", "-f", str(path), check=False)
            if proc.returncode != 0:
                self.crd_errors[str(path)] = proc.stderr.strip()
                continue
            names += [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]
        if names:
            self.kubectl("wait", "--for=condition=Established", *names, "--timeout=30s")

    def _start_controller_manager(self, deadline: float) -> None:
        assert self.dir is not None
        pki = self.dir / "pki"
        self._spawn(
            "kube-controller-manager",
            [
                str(self.bin_dir / "kube-controller-manager"),
                f"--kubeconfig={self.kubeconfig}",
                f"--authentication-kubeconfig={self.kubeconfig}",
                f"--authorization-kubeconfig={self.kubeconfig}",
                "--controllers=job,garbagecollector,namespace,serviceaccount,serviceaccount-token,"
                "resourcequota",
                f"--service-account-private-key-file={pki / 'sa.key'}",
                f"--root-ca-file={pki / 'ca.crt'}",
                "--use-service-account-credentials=false",
                "--leader-elect=false",
                "--port=0",
                "--bind-address=127.0.0.1",
                f"--secure-port={free_port()}",
                f"--cert-dir={pki / 'kcm'}",
                "--concurrent-gc-syncs=5",
                "--v=1",
            ],
        )
        # Ready when the serviceaccount and token controllers have given "default" its token.
        try:
            self.token_for_service_account(
                "default", "default", timeout=max(1.0, deadline - time.monotonic())
            )
        except TimeoutError as e:
            self._check_alive("kube-controller-manager")
            raise TimeoutError(f"kube-controller-manager not working in time: {e}") from None
