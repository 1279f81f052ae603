"""Test harness for a real Kubernetes 1.20 control plane on this machine.

- controlplane: etcd + kube-apiserver + kube-controller-manager on loopback (ControlPlane).
- kubelet: LocalKubelet, which binds Pending pods to a fake node and runs them as local processes.
- training_operators: emulated Kubeflow PyTorchJob, JobSet and Kubeflow Trainer TrainJob
  controllers (CRD stand-ins in crds/).
- plugin: pytest fixtures control_plane, k8s_namespace, kubelet, pytorchjob_controller,
  jobset_controller, trainjob_controller (enable with ``pytest_plugins = ["tests.k8s.plugin"]``).

Binaries: scripts/kube-build.sh (cached in ${SAMI_CACHE_DIR:-~/.cache/sami}/kube-1.20).
"""
