{{/* The release's name for every object (63 characters at most). */}}
{{- define "idemproxy.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Labels that select this release's pods (never change across upgrades). */}}
{{- define "idemproxy.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* The standard labels of every object. */}}
{{- define "idemproxy.labels" -}}
{{ include "idemproxy.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: idemproxy
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "idemproxy.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "idemproxy.databaseSecret" -}}
{{ .Values.database.existingSecret | default (printf "%s-database" (include "idemproxy.fullname" .)) }}
{{- end -}}

{{- define "idemproxy.adminSecret" -}}
{{ .Values.adminToken.existingSecret | default (printf "%s-admin" (include "idemproxy.fullname" .)) }}
{{- end -}}

{{/* The config file: the user's config with the fields the chart owns set. */}}
{{- define "idemproxy.config" -}}
{{- $cfg := deepCopy .Values.config -}}
{{- $host := ternary "127.0.0.1" "0.0.0.0" (eq .Values.mode "egress") -}}
{{- $_ := set $cfg "listen" (printf "%s:%v" $host .Values.ports.http) -}}
{{- $_ := set $cfg "admin" (dict "listen" (printf "0.0.0.0:%v" .Values.ports.admin) "token_env" "IDEMPROXY_ADMIN_TOKEN") -}}
{{- $db := deepCopy (.Values.config.database | default dict) -}}
{{- $_ := set $db "url" "${IDEMPROXY_DATABASE_URL}" -}}
{{- $_ := set $cfg "database" $db -}}
{{- $_ := set $cfg "data_dir" "/tmp/idemproxy" -}}
{{- if eq .Values.mode "ingress" -}}
{{- $up := deepCopy (.Values.config.upstream | default dict) -}}
{{- $_ := set $up "url" (printf "http://127.0.0.1:%v" .Values.app.port) -}}
{{- $_ := set $cfg "upstream" $up -}}
{{- end -}}
{{ toYaml $cfg }}
{{- end -}}

{{/* The idemproxy container (a plain container, or a native sidecar in egress mode). */}}
{{- define "idemproxy.container" -}}
- name: idemproxy
  image: {{ include "idemproxy.image" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  {{- if eq .Values.mode "egress" }}
  restartPolicy: Always
  {{- end }}
  args: ["serve", "--config", "/etc/idemproxy/config.yaml"]
  env:
    - name: IDEMPROXY_DATABASE_URL
      valueFrom:
        secretKeyRef: {name: {{ include "idemproxy.databaseSecret" . }}, key: {{ .Values.database.urlKey }}}
    - name: IDEMPROXY_ADMIN_TOKEN
      valueFrom:
        secretKeyRef: {name: {{ include "idemproxy.adminSecret" . }}, key: {{ .Values.adminToken.key }}}
  ports:
    {{- if ne .Values.mode "egress" }}
    - name: http
      containerPort: {{ .Values.ports.http }}
    {{- end }}
    - name: admin
      containerPort: {{ .Values.ports.admin }}
  startupProbe:
    httpGet: {path: {{ ternary "/readyz" "/healthz" (eq .Values.mode "egress") }}, port: admin}
    periodSeconds: {{ ternary 1 2 (eq .Values.mode "egress") }}
    failureThreshold: 60
  readinessProbe:
    httpGet: {path: {{ ternary "\"/readyz?store=1\"" "/readyz" .Values.readiness.requireStore }}, port: admin}
    periodSeconds: 5
    failureThreshold: 2
  livenessProbe:
    httpGet: {path: /healthz, port: admin}
    periodSeconds: 10
    failureThreshold: 3
  {{- if ne .Values.mode "egress" }}
  lifecycle:
    preStop:
      exec:
        command: ["idemproxy", "drain", "--wait", "--timeout", "{{ .Values.drain.timeoutSeconds }}s"]
  {{- end }}
  resources:
    {{- toYaml .Values.resources | nindent 4 }}
  securityContext:
    runAsUser: 10001
    runAsGroup: 10001
    allowPrivilegeEscalation: false
    readOnlyRootFilesystem: true
    capabilities:
      drop: [ALL]
  volumeMounts:
    - name: idemproxy-config
      mountPath: /etc/idemproxy
      readOnly: true
    - name: tmp
      mountPath: /tmp
{{- end -}}

{{/* The app's container (ingress and egress modes). */}}
{{- define "idemproxy.appContainer" -}}
- name: {{ .Values.app.name }}
  image: {{ required "app.image is required in ingress and egress modes" .Values.app.image }}
  {{- with .Values.app.env }}
  env:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- if eq .Values.mode "ingress" }}
  ports:
    - name: app
      containerPort: {{ .Values.app.port }}
  lifecycle:
    preStop:
      httpGet:
        path: /drainz?wait={{ .Values.drain.timeoutSeconds }}s
        port: {{ .Values.ports.admin }}
  {{- end }}
  {{- with .Values.app.resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}
