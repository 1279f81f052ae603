{{/*
The chart name, truncated to 63 characters (the DNS label limit of many name fields).
*/}}
{{- define "sami-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The full name of the release's resources: <release>-<chart>, or the release name when it
already contains the chart name. Truncated to 63 characters.
*/}}
{{- define "sami-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Chart name and version, for the helm.sh/chart label.
*/}}
{{- define "sami-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels of every resource.
*/}}
{{- define "sami-operator.labels" -}}
helm.sh/chart: {{ include "sami-operator.chart" . }}
{{ include "sami-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: sami
{{- end }}

{{/*
Labels that select the operator pod (immutable once the Deployment exists).
*/}}
{{- define "sami-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "sami-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Name of the operator's ServiceAccount.
*/}}
{{- define "sami-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "sami-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Name of the ServiceAccount stage pods run as (SAMI_WORKER_SERVICE_ACCOUNT). Empty when the chart
creates none and none is named: stage pods then run as their namespace's default.
*/}}
{{- define "sami-operator.workerServiceAccountName" -}}
{{- if .Values.workerServiceAccount.create }}
{{- $default := printf "%s-worker" (include "sami-operator.fullname" . | trunc 56 | trimSuffix "-") }}
{{- default $default .Values.workerServiceAccount.name }}
{{- else }}
{{- .Values.workerServiceAccount.name }}
{{- end }}
{{- end }}

{{/*
The operator image: repository@digest when a digest is set, else repository:tag (tag defaults
to the chart's appVersion).
*/}}
{{- define "sami-operator.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/*
The namespaces stage pods may run in when the install is namespaced: the watched namespaces,
without duplicates. Empty for a cluster-wide install.
*/}}
{{- define "sami-operator.watchNamespaces" -}}
{{- .Values.operator.watchNamespaces | uniq | join "," }}
{{- end }}

{{/*
The rules the operator needs in every namespace whose SAMIRuns it reconciles. Used by the
ClusterRole of a cluster-wide install and by the Role in each watched namespace. Each verb says
why; there are no wildcards (tests/test_chart.py checks both).
*/}}
{{- define "sami-operator.namespacedRules" -}}
# SAMIRuns: Kopf lists and watches them to run a reconcile pass per run, and patches them to
# keep its finalizer and progress annotations (prefix operator.prefix) on each one.
- apiGroups: ["sami.dev"]
  resources: ["samiruns"]
  verbs: ["list", "watch", "patch"]
# The status each pass derives from the run's children (phase, conditions, metrics).
- apiGroups: ["sami.dev"]
  resources: ["samiruns/status"]
  verbs: ["patch"]
# Children carry ownerReferences with blockOwnerDeletion; where the
# OwnerReferencesPermissionEnforcement admission plugin is on (OpenShift), setting it needs
# update on the owner's finalizers.
- apiGroups: ["sami.dev"]
  resources: ["samiruns/finalizers"]
  verbs: ["update"]
# Stage workloads for the Job launcher (and every non-training stage): created once per stage,
# listed and watched by label (the operator's cache of their state), deleted by
# spec.cleanup.children and spec.suspendPolicy stopStage, and when a run with
# cleanup.storageOnDelete is deleted.
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["list", "watch", "create", "delete"]
# The task file of each stage, mounted into its pods; deleted with its workload.
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["create", "delete"]
# Pods of the workloads (listed and watched by label): of finished ones, the rank-0 exit code
# and termination message tell a retryable failure from bad input; of unfinished ones, a
# waiting reason (a missing Secret, an image pull error) goes into the run's status.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch"]
# Training stages with spec.training.launcher PyTorchJob (Kubeflow training operator). Listed
# and watched by label where the API is served (API discovery says), deleted like Jobs (the
# server answers 404 where it is not served, which the operator expects).
- apiGroups: ["kubeflow.org"]
  resources: ["pytorchjobs"]
  verbs: ["list", "watch", "create", "delete"]
# Training stages with spec.training.launcher JobSet; watched and deleted like PyTorchJobs.
- apiGroups: ["jobset.x-k8s.io"]
  resources: ["jobsets"]
  verbs: ["list", "watch", "create", "delete"]
# Training stages with spec.training.launcher TrainJob (Kubeflow Trainer v2); watched and
# deleted like PyTorchJobs. Their JobSets are the Trainer's, garbage-collected with them.
- apiGroups: ["trainer.kubeflow.org"]
  resources: ["trainjobs"]
  verbs: ["list", "watch", "create", "delete"]
# Events on SAMIRuns (stage started, succeeded, failed, stalled; Kopf's handler errors): Kopf
# posts core/v1 Events only, so events.k8s.io is not needed. Listed and watched (reasons
# FailedCreate and FailedCreatePod only) to read why a child's pods cannot be created (quota,
# Pod Security, a missing ServiceAccount), so the run's status says why.
- apiGroups: [""]
  resources: ["events"]
  verbs: ["list", "watch", "create"]
{{- end }}

{{/*
Cluster-scoped reads Kopf makes whatever the install mode.
*/}}
{{- define "sami-operator.crdRules" -}}
# Kopf lists and watches CustomResourceDefinitions to notice when the SAMIRun CRD is added,
# upgraded (a new served version) or removed while it runs. Read-only.
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["list", "watch"]
{{- end }}

{{/*
The namespaces the chart creates the worker ServiceAccount (and, with
networkPolicy.workers.enabled, the stage pods' NetworkPolicy) in: the watched namespaces and the
release namespace, without duplicates, comma-separated.
*/}}
{{- define "sami-operator.workerNamespaces" -}}
{{- append .Values.operator.watchNamespaces .Release.Namespace | uniq | join "," }}
{{- end }}

{{/*
The egress rule to the cluster DNS (networkPolicy.dns.to; empty: port 53 anywhere).
*/}}
{{- define "sami-operator.dnsEgress" -}}
# DNS.
- ports:
    - port: 53
      protocol: UDP
    - port: 53
      protocol: TCP
  {{- with .Values.networkPolicy.dns.to }}
  to:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
