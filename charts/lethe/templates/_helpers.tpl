{{/* Chart name (nameOverride wins). */}}
{{- define "lethe.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Full name of the release's resources: "<release>-lethe", or the release name
when it already holds the chart name. */}}
{{- define "lethe.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "lethe.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "lethe.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels that select the operator pod (never change across upgrades). */}}
{{- define "lethe.selectorLabels" -}}
app.kubernetes.io/name: {{ include "lethe.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "lethe.labels" -}}
helm.sh/chart: {{ include "lethe.chart" . }}
{{ include "lethe.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: lethe
{{- end -}}

{{- define "lethe.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "lethe.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "lethe.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/* What the operator does to its own objects in a namespace it watches (or in all of
them, in a ClusterRole). Each verb is one the operator calls; see the README. */}}
{{- define "lethe.objectRules" -}}
# kopf watches both kinds; the operator reads a request's model and lists a model's
# requests
- apiGroups: [lethe.dev]
  resources: [shardedmodels, erasurerequests]
  verbs: [get, list, watch, patch]
# kopf's finalizers and progress annotations live on the objects (patch above); the
# status of both kinds is written through the status subresource
- apiGroups: [lethe.dev]
  resources: [shardedmodels/status, erasurerequests/status]
  verbs: [patch]
# finished requests are deleted after the model's TTL (the certificate stays in S3)
- apiGroups: [lethe.dev]
  resources: [erasurerequests]
  verbs: [delete]
# kopf posts an Event at each transition (counts only, never a subject id)
- apiGroups: [""]
  resources: [events]
  verbs: [create]
{{- if .Values.rbac.rayJobs }}
# spec.ray.rayJob: one KubeRay RayJob per submission, found again by name after a restart
# (garbage collection deletes them, not the operator); watched, so that a job's end
# wakes its model at once
- apiGroups: [ray.io]
  resources: [rayjobs]
  verbs: [get, list, watch, create]
{{- end }}
{{- end -}}

{{/* Reading a model's S3 credentials and a request's Secret of subject ids: get only,
never list or watch. */}}
{{- define "lethe.secretRules" -}}
- apiGroups: [""]
  resources: [secrets]
  verbs: [get]
{{- end -}}
