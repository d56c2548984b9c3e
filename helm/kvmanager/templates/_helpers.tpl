{{/*
Names and labels, in the shape `helm create` gives them.
*/}}

{{/* The chart name, at most 63 characters. */}}
{{- define "kvmanager.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The full name: release-chart, or the release name when it already contains the chart name. Room
is left for the "-headless" suffix and the pod ordinal within 63 characters.
*/}}
{{- define "kvmanager.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* The headless Service: stable per-shard DNS names <fullname>-<i>.<headless>. */}}
{{- define "kvmanager.headless" -}}
{{- printf "%s-headless" (include "kvmanager.fullname" .) }}
{{- end }}

{{/* Chart name and version, for the helm.sh/chart label. */}}
{{- define "kvmanager.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Common labels. */}}
{{- define "kvmanager.labels" -}}
helm.sh/chart: {{ include "kvmanager.chart" . }}
{{ include "kvmanager.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kvmanager
{{- end }}

{{/* Selector labels (immutable in a StatefulSet: never add to them). */}}
{{- define "kvmanager.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kvmanager.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The ServiceAccount's name. */}}
{{- define "kvmanager.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kvmanager.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The image reference; the tag defaults to the chart's appVersion. */}}
{{- define "kvmanager.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The Secret with the tenants file: the existing one, or the one the chart generates. */}}
{{- define "kvmanager.tenantsSecret" -}}
{{- default (printf "%s-tenants" (include "kvmanager.fullname" .)) .Values.tenants.existingSecret }}
{{- end }}

{{/* Where files are mounted in the container. */}}
{{- define "kvmanager.configPath" -}}/etc/kvmanager/config/kvmanager.yaml{{- end }}
{{- define "kvmanager.tenantsDir" -}}/etc/kvmanager/tenants{{- end }}
{{- define "kvmanager.tlsDir" -}}/etc/kvmanager/tls{{- end }}
{{- define "kvmanager.dataDir" -}}/data/kvmanager-data{{- end }}

{{/*
The config file: values.config plus the fields the chart owns (listen, admin, data_dir). Field
names are the binary's (kvmanager/src/main.cc LoadConfig); the chart test feeds the rendered file
to `kvmanager --check-config`.
*/}}
{{- define "kvmanager.config" -}}
{{- $owned := dict "listen" (printf "0.0.0.0:%d" (int .Values.ports.control)) "admin" (printf "0.0.0.0:%d" (int .Values.ports.admin)) "data_dir" (include "kvmanager.dataDir" .) }}
{{- toYaml (merge $owned (deepCopy .Values.config)) }}
{{- end }}

{{/* Comma-separated per-shard addresses on a port: <fullname>-<i>.<headless>.<ns>.svc:<port>. */}}
{{- define "kvmanager.shardList" -}}
{{- $root := .root }}
{{- $out := list }}
{{- range $i := until (int $root.Values.shards) }}
{{- $out = append $out (printf "%s-%d.%s.%s.svc:%d" (include "kvmanager.fullname" $root) $i (include "kvmanager.headless" $root) $root.Release.Namespace (int $.port)) }}
{{- end }}
{{- join "," $out }}
{{- end }}

{{/* HTTP or HTTPS on the admin port. */}}
{{- define "kvmanager.adminScheme" -}}
{{- if and .Values.tls.enabled .Values.tls.admin }}HTTPS{{ else }}HTTP{{ end }}
{{- end }}

{{/* The shards' pod selector: the selector labels and the shard component (not the test pod). */}}
{{- define "kvmanager.shardSelectorLabels" -}}
{{ include "kvmanager.selectorLabels" . }}
app.kubernetes.io/component: shard
{{- end }}
