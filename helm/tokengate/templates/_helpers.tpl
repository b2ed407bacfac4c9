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
Values checks that helm would otherwise turn into a pod that cannot start.
*/}}
{{- define "tokengate.validate" -}}
{{- $_ := required "app.image.repository is required: the image of the service tokengate protects" .Values.app.image.repository }}
{{- $ports := list (int .Values.app.port) (int .Values.tokengate.port) (int .Values.admin.port) }}
{{- if ne (len (uniq $ports)) 3 }}
{{- fail (printf "app.port (%d), tokengate.port (%d) and admin.port (%d) must differ: the containers of a pod share one network namespace" (int .Values.app.port) (int .Values.tokengate.port) (int .Values.admin.port)) }}
{{- end }}
{{- if or (lt (int .Values.tokengate.port) 1024) (lt (int .Values.admin.port) 1024) }}
{{- fail "tokengate.port and admin.port must be 1024 or more: tokengate runs as a non-root user without capabilities (the Service's port can still be 443 or 80)" }}
{{- end }}
{{- if and .Values.tls.enabled (not .Values.tls.secretName) }}
{{- fail "tls.enabled needs tls.secretName: a kubernetes.io/tls Secret with tls.crt and tls.key" }}
{{- end }}
{{- if and .Values.tls.clientCaSecretName (not .Values.tls.enabled) }}
{{- fail "tls.clientCaSecretName needs tls.enabled" }}
{{- end }}
{{- if not (has .Values.store.backend (list "sqlite" "redis" "memory")) }}
{{- fail (printf "store.backend must be sqlite, redis or memory, not %q" (toString .Values.store.backend)) }}
{{- end }}
{{- if and (eq .Values.store.backend "redis") (not .Values.store.redis.urlSecretName) }}
{{- fail "store.backend redis needs store.redis.urlSecretName: a Secret holding the redis:// URL" }}
{{- end }}
{{- end }}

{{/*
A TOML basic string. JSON string escapes (\" \\ \n \uXXXX ...) are valid TOML escapes.
*/}}
{{- define "tokengate.str" -}}
{{- . | toString | toJson }}
{{- end }}

{{/*
One [[route]] table. Called with (dict "route" MAP "upstream" DEFAULT_UPSTREAM "where" NAME).
Keys are those of SPEC §3 [[route]], in camelCase.
*/}}
{{- define "tokengate.route" -}}
{{- $r := .route }}
{{- $allowed := list "auth" "preserveHost" "timeout" "upstreamCa" "upstreamAuth" "identityHeaders" }}
{{- if not .pathPrefix }}
{{- $allowed = concat (list "pathPrefix" "upstream") $allowed }}
{{- end }}
{{- range $k, $_ := $r }}
{{- if not (has $k $allowed) }}
{{- fail (printf "%s: unknown key %q (allowed: %s)" $.where $k (join ", " $allowed)) }}
{{- end }}
{{- end }}
[[route]]
path_prefix = {{ include "tokengate.str" (default $r.pathPrefix .pathPrefix | required (printf "%s.pathPrefix is required" .where)) }}
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
header = {{ include "tokengate.str" (required (printf "%s.upstreamAuth.header is required" $.where) .header) }}
value = {{ include "tokengate.str" (required (printf "%s.upstreamAuth.value is required" $.where) .value) }}
{{- end }}
{{- with $r.identityHeaders }}
[route.identity_headers]
{{- range $name, $value := . }}
{{ include "tokengate.str" $name }} = {{ include "tokengate.str" $value }}
{{- end }}
{{- end }}
{{- end }}

{{/*
One [[validator]] table. Called with (dict "v" MAP "where" NAME).
*/}}
{{- define "tokengate.validator" -}}
{{- $v := .v }}
{{- $type := required (printf "%s.type is required (static, introspect or jwt)" .where) $v.type }}
{{- $allowed := dict "static" (list "type" "tokens") "introspect" (list "type" "url" "header" "value" "subject" "account" "timeout") "jwt" (list "type" "issuer" "audience" "jwksUrl" "publicKey" "secret" "subjectClaim") }}
{{- if not (hasKey $allowed $type) }}
{{- fail (printf "%s.type must be static, introspect or jwt, not %q" .where (toString $type)) }}
{{- end }}
{{- $keys := get $allowed $type }}
{{- range $k, $_ := $v }}
{{- if not (has $k $keys) }}
{{- fail (printf "%s: unknown key %q for type %s (allowed: %s)" $.where $k $type (join ", " $keys)) }}
{{- end }}
{{- end }}
[[validator]]
type = {{ include "tokengate.str" $type }}
{{- if eq $type "static" }}
{{- if not $v.tokens }}
{{- fail (printf "%s: a static validator needs tokens: [{sha256, subject, account}]" .where) }}
{{- end }}
{{- range $i, $t := $v.tokens }}
{{- range $k, $_ := $t }}
{{- if not (has $k (list "sha256" "subject" "account")) }}
{{- fail (printf "%s.tokens[%d]: unknown key %q (allowed: sha256, subject, account)" $.where $i $k) }}
{{- end }}
{{- end }}
[[validator.token]]
sha256 = {{ include "tokengate.str" (required (printf "%s.tokens[%d].sha256 is required (tokengate hash TOKEN)" $.where $i) $t.sha256) }}
subject = {{ include "tokengate.str" (required (printf "%s.tokens[%d].subject is required" $.where $i) $t.subject) }}
{{- with $t.account }}
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
format = {{ include "tokengate.str" $c.tokens.format }}
{{- with $c.tokens.jwtKey }}
jwt_key = {{ include "tokengate.str" . }}
{{- end }}
{{- range $i, $v := $c.validators }}

{{ include "tokengate.validator" (dict "v" $v "where" (printf "config.validators[%d]" $i)) | trim }}
{{- end }}

{{ include "tokengate.route" (dict "route" $c.route "pathPrefix" "/" "upstream" (printf "http://127.0.0.1:%d" (int .Values.app.port)) "where" "config.route") | trim }}
{{- range $i, $r := $c.extraRoutes }}

{{ include "tokengate.route" (dict "route" $r "upstream" (printf "http://127.0.0.1:%d" (int $.Values.app.port)) "where" (printf "config.extraRoutes[%d]" $i)) | trim }}
{{- end }}
{{- with $c.extraToml }}

{{ . }}
{{- end }}
{{- end }}
