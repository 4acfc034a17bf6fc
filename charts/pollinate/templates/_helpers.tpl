{{/* Names, labels and the RBAC rules of the hub chart, defined once. */}}

{{- define "pollinate.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "pollinate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "pollinate.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/*
The operator pod's identity. app.kubernetes.io/name is "pollinate-operator", not the chart's
name: every Flower server's NetworkPolicy admits pods with exactly this label to its control
API (pollinate_operator.settings.Settings.operator_labels).
*/}}
{{- define "pollinate.selectorLabels" -}}
app.kubernetes.io/name: pollinate-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "pollinate.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "pollinate.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: pollinate
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "pollinate.image" -}}
{{- printf "%s:%s" .Values.image.repository .Values.image.tag -}}
{{- end -}}

{{/*
What the operator does in a namespace it serves, and nothing more. Derived from the code:
pollinate_operator/clients/kube.py (every API call), handlers/*.py (what is applied, read,
deleted) and kopf itself (watching, finalizers, status, events). Children are written by
server-side apply, which needs "create" for a new object and "patch" for an existing one.
tests/integration/test_charts.py asserts this exact set and runs the operator under it.
*/}}
{{- define "pollinate.namespacedRules" -}}
# kopf lists and watches both kinds and patches its finalizer and progress annotations onto
# them; every pass reads its object fresh (handlers/level_triggered.live_body) and the
# TrainingRound handler also reads its Federation (kube.get_custom).
- apiGroups: [pollinate.dev]
  resources: [federations]
  verbs: [get, list, watch, patch]
- apiGroups: [pollinate.dev]
  resources: [trainingrounds]
  verbs: [get, list, watch, patch]
# Handlers return their status; kopf writes it through the status subresource.
- apiGroups: [pollinate.dev]
  resources: [federations/status, trainingrounds/status]
  verbs: [patch]
# Children carry ownerReferences with blockOwnerDeletion, which clusters running the
# OwnerReferencesPermissionEnforcement admission plugin (e.g. OpenShift) allow only to who
# may update the owner's finalizers.
- apiGroups: [pollinate.dev]
  resources: [federations/finalizers, trainingrounds/finalizers]
  verbs: [update]
# The federation CA, the server certificate and one key per site: read, listed by label,
# applied, and a removed site's key deleted. Also reads the S3 credentials Secret. Watched
# (only those the operator manages, by label) so that a deleted site key is replaced and its
# old key unregistered at once.
- apiGroups: [""]
  resources: [secrets]
  verbs: [get, list, watch, create, patch, delete]
# The Flower server's Service; watched (as are the Ingress and the NetworkPolicy) so that a
# changed or deleted one is applied again at once, instead of being re-sent on every pass.
# Every child is read (get) before it is applied: one that exists and is not the owner's own
# is never taken over (clients/kube.py NotOurs); list and watch show as much already.
- apiGroups: [""]
  resources: [services]
  verbs: [get, list, watch, create, patch]
# Client pods, to tell an unschedulable site (no free GPU) from a slow one.
- apiGroups: [""]
  resources: [pods]
  verbs: [list]
# Events on Federations and TrainingRounds (handlers' and kopf's).
- apiGroups: [""]
  resources: [events]
  verbs: [create]
# The Flower server's Deployment, and its ready replicas (read through /status); watched so
# a change to it wakes its Federation's pass at once.
- apiGroups: [apps]
  resources: [deployments]
  verbs: [get, list, watch, create, patch]
- apiGroups: [apps]
  resources: [deployments/status]
  verbs: [get]
# One client Job per in-cluster site and TrainingRound; deleted when a site is dropped;
# watched so a change to one wakes its TrainingRound's pass at once.
- apiGroups: [batch]
  resources: [jobs]
  verbs: [get, list, watch, create, patch, delete]
# The server's Ingress (the fleet path only) and the NetworkPolicy around it.
- apiGroups: [networking.k8s.io]
  resources: [ingresses, networkpolicies]
  verbs: [get, list, watch, create, patch]
{{- end -}}

{{/*
What kopf needs cluster-wide when it serves every namespace: to notice the CRDs appear or
change (an operator started before its CRDs still finds them), and its peering object, used
only if the kopf.dev peering CRDs are installed (peering is optional: a single replica runs
without it). Namespaces are not listed: kopf does so only when serving a list of them.
*/}}
{{- define "pollinate.clusterRules" -}}
- apiGroups: [apiextensions.k8s.io]
  resources: [customresourcedefinitions]
  verbs: [list, watch]
- apiGroups: [kopf.dev]
  resources: [clusterkopfpeerings]
  verbs: [list, watch]
# The operator's peering name (handlers/__init__.py: settings.peering.name).
- apiGroups: [kopf.dev]
  resources: [clusterkopfpeerings]
  resourceNames: [pollinate-operator]
  verbs: [patch]
{{- end -}}


{{/* A label map as the operator reads it from the environment: k=v,k2=v2 (sorted). */}}
{{- define "pollinate.labelList" -}}
{{- $items := list -}}
{{- range $k, $v := . -}}
{{- $items = append $items (printf "%s=%s" $k $v) -}}
{{- end -}}
{{- join "," $items -}}
{{- end -}}
