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

{{/* A probe's handler. kubelet's built-in gRPC probe speaks plaintext only, so with TLS on the probe
runs the image's own health check, which verifies the certificate against the CA in the TLS Secret
under the certificate's own name (the probe connects to 127.0.0.1). */}}
{{- define "steerwatch.probeHandler" -}}
{{- if .Values.tls.enabled -}}
exec:
  command: ["python", "-m", "service.health", "--target", "127.0.0.1:{{ .Values.ports.grpc }}", "--timeout", "3", "--tls-root-cert", "/etc/steerwatch/tls/{{ .Values.tls.caKey }}", "--tls-server-name", {{ .Values.tls.serverName | quote }}]
{{- else -}}
grpc:
  port: {{ .Values.ports.grpc }}
{{- end -}}
{{- end -}}
