{{/*
Names and labels.
*/}}
{{- define "tokengate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "tokengate.fullname" -}}
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

{{- define "tokengate.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "tokengate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tokengate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "tokengate.labels" -}}
helm.sh/chart: {{ include "tokengate.chart" . }}
{{ include "tokengate.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | toString | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "tokengate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "tokengate.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Fixed paths inside the tokengate container. The config file, the TLS Secret and the client CA
Secret are mounted read-only; the sqlite store lives on its own volume.
*/}}
{{- define "tokengate.configDir" -}}/etc/tokengate{{- end }}
{{- define "tokengate.tlsDir" -}}/etc/tokengate/tls{{- end }}
{{- define "tokengate.clientCaDir" -}}/etc/tokengate/client-ca{{- end }}
{{- define "tokengate.dataDir" -}}/var/lib/tokengate{{- end }}

{{/*
Checks across values that values.schema.json cannot express; each would otherwise become a pod
that cannot start. Types, enums and unknown keys are the schema's job.
*/}}
{{- define "tokengate.validate" -}}
{{- if eq .Values.mode "deployment" }}
{{- $_ := required "app.image.repository is required: the image of the service tokengate protects (or mode=sidecar to add tokengate to an existing Deployment)" .Values.app.image.repository }}
{{- else }}
{{- $_ := required "mode=sidecar needs sidecar.deployment: the name of the existing Deployment the patch adds tokengate to" .Values.sidecar.deployment }}
{{- if and .Values.sidecar.service (not .Values.service.port) }}
{{- fail "sidecar.service needs service.port: the port of that Service to re-aim at tokengate" }}
{{- end }}
{{- if and .Values.networkPolicy.enabled (not .Values.sidecar.podSelector) }}
{{- fail "networkPolicy.enabled with mode=sidecar needs sidecar.podSelector: the labels of your Deployment's pods" }}
{{- end }}
{{- end }}
{{- $ports := list (int .Values.app.port) (int .Values.tokengate.port) (int .Values.admin.port) }}
{{- if ne (len (uniq $ports)) 3 }}
{{- fail (printf "app.port (%d), tokengate.port (%d) and admin.port (%d) must differ: the containers of a pod share one network namespace" (int .Values.app.port) (int .Values.tokengate.port) (int .Values.admin.port)) }}
{{- end }}
{{- if and .Values.tls.enabled (not .Values.tls.secretName) }}
{{- fail "tls.enabled needs tls.secretName: a kubernetes.io/tls Secret with tls.crt and tls.key" }}
{{- end }}
{{- if and .Values.tls.clientCaSecretName (not .Values.tls.enabled) }}
{{- fail "tls.clientCaSecretName needs tls.enabled" }}
{{- end }}
{{- if and (eq .Values.store.backend "redis") (not .Values.store.redis.urlSecretName) }}
{{- fail "store.backend redis needs store.redis.urlSecretName: a Secret holding the redis:// URL" }}
{{- end }}
{{- end }}

{{/*
The pod template annotations tokengate needs: the config checksum (a config change rolls the
pods) and the Prometheus scrape annotations for the admin port.
*/}}
{{- define "tokengate.podAnnotations" -}}
checksum/config: {{ include "tokengate.config" . | sha256sum }}
{{- if .Values.metrics.scrape }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .Values.admin.port | toString | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- end }}

{{/*
"true" when the sqlite store is on a PersistentVolumeClaim: a ReadWriteOnce claim cannot be
attached to an old and a new pod at once (Recreate), and needs fsGroup to be writable by
tokengate's group.
*/}}
{{- define "tokengate.sqlitePvc" -}}
{{- if and (eq .Values.store.backend "sqlite") .Values.store.persistentVolumeClaim }}true{{ end }}
{{- end }}

{{/*
The tokengate container, as one item of a containers list. The same in both modes: the chart's
Deployment (mode=deployment) and the patch for an existing Deployment (mode=sidecar).
Volume and port names carry a tokengate prefix so they cannot collide with the app's.
*/}}
{{- define "tokengate.container" -}}
- name: tokengate
  image: {{ printf "%s:%s" .Values.tokengate.image.repository (.Values.tokengate.image.tag | default .Chart.AppVersion | toString) | quote }}
  imagePullPolicy: {{ .Values.tokengate.image.pullPolicy }}
  args:
    - serve
    - --config
    - {{ include "tokengate.configDir" . }}/tokengate.toml
    - --log-format
    - {{ .Values.tokengate.logFormat }}
  ports:
    - name: tokengate
      containerPort: {{ int .Values.tokengate.port }}
      protocol: TCP
    - name: tokengate-admin
      containerPort: {{ int .Values.admin.port }}
      protocol: TCP
  env:
    - name: RUST_LOG
      value: {{ .Values.tokengate.logLevel | quote }}
    {{- if .Values.admin.tokenSecretName }}
    - name: TOKENGATE_ADMIN_TOKEN
      valueFrom:
        secretKeyRef:
          name: {{ .Values.admin.tokenSecretName }}
          key: {{ .Values.admin.tokenSecretKey }}
    {{- end }}
    {{- if eq .Values.store.backend "redis" }}
    - name: TOKENGATE_REDIS_URL
      valueFrom:
        secretKeyRef:
          name: {{ .Values.store.redis.urlSecretName }}
          key: {{ .Values.store.redis.urlSecretKey }}
    {{- end }}
    {{- with .Values.tokengate.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  livenessProbe:
    httpGet:
      path: /healthz
      port: tokengate-admin
      scheme: HTTP
    {{- with .Values.tokengate.livenessProbe }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  readinessProbe:
    httpGet:
      path: /readyz
      port: tokengate-admin
      scheme: HTTP
    {{- with .Values.tokengate.readinessProbe }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with .Values.tokengate.resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml .Values.tokengate.securityContext | nindent 4 }}
  volumeMounts:
    - name: tokengate-config
      mountPath: {{ include "tokengate.configDir" . }}
      readOnly: true
    {{- if .Values.tls.enabled }}
    - name: tokengate-tls
      mountPath: {{ include "tokengate.tlsDir" . }}
      readOnly: true
    {{- if .Values.tls.clientCaSecretName }}
    - name: tokengate-client-ca
      mountPath: {{ include "tokengate.clientCaDir" . }}
      readOnly: true
    {{- end }}
    {{- end }}
    {{- if eq .Values.store.backend "sqlite" }}
    - name: tokengate-data
      mountPath: {{ include "tokengate.dataDir" . }}
    {{- end }}
    # Writable scratch space on a read-only root filesystem.
    - name: tokengate-tmp
      mountPath: /tmp
{{- end }}

{{/*
The volumes the tokengate container mounts, as list items.
*/}}
{{- define "tokengate.volumes" -}}
- name: tokengate-config
  configMap:
    name: {{ include "tokengate.fullname" . }}
{{- if .Values.tls.enabled }}
- name: tokengate-tls
  secret:
    secretName: {{ .Values.tls.secretName }}
{{- if .Values.tls.clientCaSecretName }}
- name: tokengate-client-ca
  secret:
    secretName: {{ .Values.tls.clientCaSecretName }}
{{- end }}
{{- end }}
{{- if eq .Values.store.backend "sqlite" }}
- name: tokengate-data
  {{- if .Values.store.persistentVolumeClaim }}
  persistentVolumeClaim:
    claimName: {{ .Values.store.persistentVolumeClaim }}
  {{- else }}
  emptyDir:
    {{- toYaml (.Values.store.emptyDir | default dict) | nindent 4 }}
  {{- end }}
{{- end }}
- name: tokengate-tmp
  emptyDir:
    sizeLimit: 64Mi
{{- end }}

{{/*
A TOML basic string. JSON string escapes (\" \\ \n \uXXXX ...) are valid TOML escapes.
*/}}
{{- define "tokengate.str" -}}
{{- . | toString | toJson }}
{{- end }}

{{/*
One [[route]] table. Called with (dict "route" MAP "upstream" DEFAULT_UPSTREAM ["pathPrefix" P]).
Keys are those of SPEC §3 [[route]], in camelCase; values.schema.json has already refused
unknown keys, wrong types and missing required keys.
*/}}
{{- define "tokengate.route" -}}
{{- $r := .route }}
[[route]]
path_prefix = {{ include "tokengate.str" (default $r.pathPrefix .pathPrefix) }}
upstream = {{ include "tokengate.str" (default .upstream $r.upstream) }}
{{- if not (kindIs "invalid" $r.auth) }}
auth = {{ include "tokengate.str" $r.auth }}
{{- end }}
{{- if not (kindIs "invalid" $r.preserveHost) }}
preserve_host = {{ $r.preserveHost }}
{{- end }}
{{- if not (kindIs "invalid" $r.timeout) }}
timeout = {{ include "tokengate.str" $r.timeout }}
{{- end }}
{{- with $r.upstreamCa }}
upstream_ca = {{ include "tokengate.str" . }}
{{- end }}
{{- with $r.upstreamAuth }}
[route.upstream_auth]
header = {{ include "tokengate.str" .header }}
value = {{ include "tokengate.str" .value }}
{{- end }}
{{- with $r.identityHeaders }}
[route.identity_headers]
{{- range $name, $value := . }}
{{ include "tokengate.str" $name }} = {{ include "tokengate.str" $value }}
{{- end }}
{{- end }}
{{- end }}

{{/*
One [[validator]] table. Called with (dict "v" MAP); values.schema.json has already checked the
type and the keys allowed for it.
*/}}
{{- define "tokengate.validator" -}}
{{- $v := .v }}
{{- $type := $v.type }}
{{- $keys := get (dict "static" (list "type" "tokens") "introspect" (list "type" "url" "header" "value" "subject" "account" "timeout") "jwt" (list "type" "issuer" "audience" "jwksUrl" "publicKey" "secret" "subjectClaim")) $type }}
[[validator]]
type = {{ include "tokengate.str" $type }}
{{- if eq $type "static" }}
{{- range $v.tokens }}
[[validator.token]]
sha256 = {{ include "tokengate.str" .sha256 }}
subject = {{ include "tokengate.str" .subject }}
{{- with .account }}
account = {{ include "tokengate.str" . }}
{{- end }}
{{- end }}
{{- else }}
{{- $toml := dict "url" "url" "header" "header" "value" "value" "subject" "subject" "account" "account" "timeout" "timeout" "issuer" "issuer" "audience" "audience" "jwksUrl" "jwks_url" "publicKey" "public_key" "secret" "secret" "subjectClaim" "subject_claim" }}
{{- range $k := $keys }}
{{- if and (ne $k "type") (not (kindIs "invalid" (get $v $k))) }}
{{ get $toml $k }} = {{ include "tokengate.str" (get $v $k) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The tokengate config file (SPEC §3), rendered from values. Its sha256 is the pod template's
checksum/config annotation, so a config change rolls the pods.
*/}}
{{- define "tokengate.config" -}}
{{- $c := .Values.config -}}
# tokengate config rendered by the Helm chart {{ include "tokengate.chart" . }} from its values.
# Keys: SPEC §3 and README.md. Check a copy with `tokengate check --config FILE`.

[server]
listen = {{ include "tokengate.str" (printf "0.0.0.0:%d" (int .Values.tokengate.port)) }}
max_header_bytes = {{ $c.server.maxHeaderBytes | int64 }}
max_body_bytes = {{ include "tokengate.str" $c.server.maxBodyBytes }}
header_read_timeout = {{ include "tokengate.str" $c.server.headerReadTimeout }}
max_connections = {{ $c.server.maxConnections | int64 }}
drain_timeout = {{ include "tokengate.str" $c.server.drainTimeout }}
{{- if .Values.tls.enabled }}

[server.tls]
cert = {{ include "tokengate.str" (printf "%s/tls.crt" (include "tokengate.tlsDir" .)) }}
key = {{ include "tokengate.str" (printf "%s/tls.key" (include "tokengate.tlsDir" .)) }}
{{- if .Values.tls.clientCaSecretName }}
client_ca = {{ include "tokengate.str" (printf "%s/%s" (include "tokengate.clientCaDir" .) .Values.tls.clientCaKey) }}
client_auth = {{ include "tokengate.str" .Values.tls.clientAuth }}
{{- end }}
proxy_certificates = {{ .Values.tls.proxyCertificates }}
{{- end }}

[admin]
listen = {{ include "tokengate.str" (printf "0.0.0.0:%d" (int .Values.admin.port)) }}
{{- if .Values.admin.tokenSecretName }}
token = "${env:TOKENGATE_ADMIN_TOKEN}"
{{- end }}

[endpoints]
tokens_prefix = {{ include "tokengate.str" $c.endpoints.tokensPrefix }}
insight = {{ $c.endpoints.insight }}

[credentials]
sources = {{ $c.credentials.sources | toJson }}

[cache]
ttl = {{ include "tokengate.str" $c.cache.ttl }}
negative_ttl = {{ include "tokengate.str" $c.cache.negativeTtl }}
max_entries = {{ $c.cache.maxEntries | int64 }}

[store]
backend = {{ include "tokengate.str" .Values.store.backend }}
{{- if eq .Values.store.backend "sqlite" }}
path = {{ include "tokengate.str" (printf "%s/tokengate.db" (include "tokengate.dataDir" .)) }}
{{- else if eq .Values.store.backend "redis" }}
url = "${env:TOKENGATE_REDIS_URL}"
{{- end }}

[tokens]
default_ttl = {{ include "tokengate.str" $c.tokens.defaultTtl }}
max_ttl = {{ include "tokengate.str" $c.tokens.maxTtl }}
format = {{ include "tokengate.str" $c.tokens.format }}
{{- with $c.tokens.jwtKey }}
jwt_key = {{ include "tokengate.str" . }}
{{- end }}
{{- range $v := $c.validators }}

{{ include "tokengate.validator" (dict "v" $v) | trim }}
{{- end }}

{{ include "tokengate.route" (dict "route" $c.route "pathPrefix" "/" "upstream" (printf "http://127.0.0.1:%d" (int .Values.app.port))) | trim }}
{{- range $r := $c.extraRoutes }}

{{ include "tokengate.route" (dict "route" $r "upstream" (printf "http://127.0.0.1:%d" (int $.Values.app.port))) | trim }}
{{- end }}
{{- with $c.extraToml }}

{{ . }}
{{- end }}
{{- end }}

{{/*
mode=sidecar: a strategic-merge patch for the existing Deployment sidecar.deployment. Lists of
containers and volumes merge by name, so the patch adds the tokengate container and its volumes
beside the app's and changes nothing else of the app.
*/}}
{{- define "tokengate.deploymentPatch" -}}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ .Values.sidecar.deployment }}
spec:
  {{- if include "tokengate.sqlitePvc" . }}
  strategy:
    type: Recreate
    rollingUpdate: null
  {{- end }}
  template:
    metadata:
      annotations:
        {{- include "tokengate.podAnnotations" . | nindent 8 }}
    spec:
      {{- if and (include "tokengate.sqlitePvc" .) .Values.podSecurityContext.fsGroup }}
      securityContext:
        fsGroup: {{ .Values.podSecurityContext.fsGroup }}
      {{- end }}
      containers:
        {{- include "tokengate.container" . | nindent 8 }}
      volumes:
        {{- include "tokengate.volumes" . | nindent 8 }}
{{- end }}

{{/*
mode=sidecar with sidecar.service: a strategic-merge patch that aims the Service's port
service.port at tokengate (ports merge by port number; name and protocol stay).
*/}}
{{- define "tokengate.servicePatch" -}}
apiVersion: v1
kind: Service
metadata:
  name: {{ .Values.sidecar.service }}
spec:
  ports:
    - port: {{ int .Values.service.port }}
      targetPort: {{ int .Values.tokengate.port }}
{{- end }}
