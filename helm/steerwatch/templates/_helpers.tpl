{{/* Chart name, truncated to 63 characters (a DNS label). */}}
{{- define "steerwatch.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Release-qualified name: <release>-steerwatch, or the release name when it already contains it. */}}
{{- define "steerwatch.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Standard labels (app.kubernetes.io/*, helm.sh/chart). */}}
{{- define "steerwatch.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "steerwatch.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: steerwatch
{{- end -}}

{{/* Selector labels: stable across upgrades. */}}
{{- define "steerwatch.selectorLabels" -}}
app.kubernetes.io/name: {{ include "steerwatch.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* The Secret holding the external Redis URL (key redis-url) and the bootstrap admin key (admin-key). */}}
{{- define "steerwatch.secretName" -}}
{{- default (include "steerwatch.fullname" .) .Values.secrets.existingSecret -}}
{{- end -}}

{{/* The image reference; the tag defaults to the chart's appVersion. */}}
{{- define "steerwatch.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
