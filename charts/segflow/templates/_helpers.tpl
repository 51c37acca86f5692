{{- define "segflow.labels" -}}
app.kubernetes.io/name: segflow
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end -}}
