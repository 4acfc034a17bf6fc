{{/* Names, labels and paths of the site chart, defined once. */}}

{{- define "pollinate-site.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* The same identity labels as the hub's in-cluster client Jobs (manifests/names.py). */}}
{{- define "pollinate-site.selectorLabels" -}}
app.kubernetes.io/name: pollinate-client
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "pollinate-site.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "pollinate-site.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: site-client
app.kubernetes.io/part-of: pollinate
app.kubernetes.io/managed-by: {{ .Release.Service }}
pollinate.dev/site: {{ .Values.site }}
{{- end -}}

{{/* The Secret holding site.key and ca.crt: the user's, or the one this chart creates. */}}
{{- define "pollinate-site.identitySecret" -}}
{{- .Values.identity.existingSecret | default (printf "%s-identity" (include "pollinate-site.fullname" .)) -}}
{{- end -}}

{{/* The data path the client reads: /data, or a file or folder inside it. */}}
{{- define "pollinate-site.dataPath" -}}
{{- if .Values.data.path -}}
/data/{{ trimPrefix "/" .Values.data.path }}
{{- else -}}
/data
{{- end -}}
{{- end -}}

{{/* The data volume's source, exactly one (the schema enforces it). */}}
{{- define "pollinate-site.dataSource" -}}
{{- with .Values.data -}}
{{- if .persistentVolumeClaim -}}
persistentVolumeClaim:
  claimName: {{ .persistentVolumeClaim.claimName }}
  readOnly: true
{{- else if .hostPath -}}
hostPath:
  path: {{ .hostPath.path }}
  type: {{ .hostPath.type | default "Directory" }}
{{- else if .configMap -}}
configMap:
  name: {{ .configMap.name }}
{{- else -}}
{{- fail "data: give exactly one of data.persistentVolumeClaim, data.hostPath or data.configMap" -}}
{{- end -}}
{{- end -}}
{{- end -}}
