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
The app's address: "unix:<upstreamSocket>", or http://127.0.0.1:<app.port>. With upstreamSocket
the emptyDir tokengate-socket is mounted at the socket's folder (socketDir) in both containers.
*/}}
{{- define "tokengate.appUpstream" -}}
{{- if .Values.upstreamSocket }}unix:{{ .Values.upstreamSocket }}
{{- else }}http://127.0.0.1:{{ int .Values.app.port }}
{{- end }}
{{- end }}
{{- define "tokengate.socketDir" -}}{{ dir .Values.upstreamSocket }}{{- end }}

{{/*
The mount of the socket's folder, as a volumeMounts item (the same in both containers).
*/}}
{{- define "tokengate.socketMount" -}}
- name: tokengate-socket
  mountPath: {{ include "tokengate.socketDir" . }}
{{- end }}

{{/*
Checks across values that values.schema.json cannot express; each would otherwise become a pod
that cannot start. Types, enums and unknown keys are the schema's job.
*/}}
{{- define "tokengate.validate" -}}
{{- if eq .Values.mode "deployment" }}
{{- $_ := required "app.image.repository is required: the image of the service tokengate protects (or mode=sidecar to add tokengate to an existing Deployment)" .Values.app.image.repository }}
{{- else }}
{{- $_ := required "mode=sidecar needs sidecar.deployment: the name of the existing Deployment the patch adds tokengate to" .Values.sidecar.deployment }}
{{- $_ := required "mode=sidecar needs sidecar.container: the name of your app's container in that Deployment (it stays first, and kubectl logs and exec pick it by default)" .Values.sidecar.container }}
{{- if eq .Values.sidecar.container "tokengate" }}
{{- fail "sidecar.container is your app's container, not tokengate's: the patch adds the container named tokengate" }}
{{- end }}
{{- if and .Values.sidecar.service (not .Values.service.port) }}
{{- fail "sidecar.service needs service.port: the port of that Service to re-aim at tokengate" }}
{{- end }}
{{- if and .Values.networkPolicy.enabled (not .Values.sidecar.podSelector) }}
{{- fail "networkPolicy.enabled with mode=sidecar needs sidecar.podSelector: the labels of your Deployment's pods" }}
{{- end }}
{{- end }}
{{- if .Values.upstreamSocket }}
{{- $dir := include "tokengate.socketDir" . }}
{{- range $own := list (include "tokengate.configDir" .) (include "tokengate.dataDir" .) "/tmp" }}
{{- if or (eq $dir $own) (hasPrefix (printf "%s/" $own) $dir) }}
{{- fail (printf "upstreamSocket %s: its folder %s is, or is inside, %s, which tokengate's container mounts itself (/etc/tokengate, /var/lib/tokengate and /tmp are taken): put the socket in a folder of its own, e.g. /run/app/app.sock" $.Values.upstreamSocket $dir $own) }}
{{- end }}
{{- end }}
{{- if eq .Values.mode "deployment" }}
{{- range .Values.app.volumeMounts }}
{{- if eq (toString .mountPath) $dir }}
{{- fail (printf "upstreamSocket's folder %s is already a mount of app.volumeMounts (%s): the chart mounts the socket's emptyDir there; put the socket in another folder" $dir (toString .name)) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- $ports := list (int .Values.tokengate.port) (int .Values.admin.port) }}
{{- if not .Values.upstreamSocket }}
{{- $ports = prepend $ports (int .Values.app.port) }}
{{- end }}
{{- if .Values.verify.enabled }}
{{- $ports = append $ports (int .Values.verify.port) }}
{{- end }}
{{- if ne (len (uniq $ports)) (len $ports) }}
{{- if .Values.upstreamSocket }}
{{- fail (printf "tokengate.port (%d), admin.port (%d)%s must differ: each is a listener of tokengate's" (int .Values.tokengate.port) (int .Values.admin.port) (ternary (printf " and verify.port (%d)" (int .Values.verify.port)) "" .Values.verify.enabled)) }}
{{- end }}
{{- if .Values.verify.enabled }}
{{- fail (printf "app.port (%d), tokengate.port (%d), admin.port (%d) and verify.port (%d) must differ: the containers of a pod share one network namespace" (int .Values.app.port) (int .Values.tokengate.port) (int .Values.admin.port) (int .Values.verify.port)) }}
{{- end }}
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
{{- if .Values.verify.enabled }}
{{- if and .Values.verify.tls (not .Values.tls.enabled) }}
{{- fail "verify.tls needs tls.enabled: [verify.tls] uses the main listener's certificate" }}
{{- end }}
{{- if not (or .Values.verify.tokenSecretName (and .Values.verify.tls .Values.tls.clientCaSecretName)) }}
{{- fail "verify.enabled needs verify.tokenSecretName, or verify.tls with tls.clientCaSecretName: tokengate refuses a decision listener beyond loopback that does not know who asks" }}
{{- end }}
{{- end }}
{{- if .Values.configFile }}
{{- include "tokengate.checkConfigFile" . }}
{{- else }}
{{- if and .Values.config.x509.enabled (not .Values.tls.clientCaSecretName) }}
{{- fail "config.x509.enabled needs tls.clientCaSecretName: the exchange verifies client certificates against that CA" }}
{{- end }}
{{- if and .Values.config.limits.shared (ne .Values.store.backend "redis") }}
{{- fail (printf "config.limits.shared keeps the rate-limit buckets in Redis: it needs store.backend redis (store.backend is %s)" .Values.store.backend) }}
{{- end }}
{{- $state := dict "tables" (dict) "arrays" (dict) "values" (dict) "env" (dict) "current" "" }}
{{- include "tokengate.scanToml" (dict "text" (include "tokengate.chartConfig" .) "source" "chart" "state" $state) }}
{{- include "tokengate.scanToml" (dict "text" .Values.config.extraToml "source" "config.extraToml" "state" $state) }}
{{- include "tokengate.checkEnv" (dict "state" $state "Values" .Values "source" "the rendered config") }}
{{- end }}
{{- end }}

{{/*
The pod template annotations tokengate needs: the config checksum (a config change rolls the
pods), the app's container as the one kubectl logs / exec / attach pick without -c, and the
Prometheus scrape annotations for the admin port.
*/}}
{{- define "tokengate.podAnnotations" -}}
checksum/config: {{ include "tokengate.config" . | sha256sum }}
kubectl.kubernetes.io/default-container: {{ ternary .Values.app.name .Values.sidecar.container (eq .Values.mode "deployment") }}
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
    {{- if .Values.verify.enabled }}
    - name: tokengate-verify
      containerPort: {{ int .Values.verify.port }}
      protocol: TCP
    {{- end }}
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
    {{- if and .Values.verify.enabled .Values.verify.tokenSecretName }}
    - name: TOKENGATE_VERIFY_TOKEN
      valueFrom:
        secretKeyRef:
          name: {{ .Values.verify.tokenSecretName }}
          key: {{ .Values.verify.tokenSecretKey }}
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
    {{- if .Values.upstreamSocket }}
    # The folder of the app's socket (upstreamSocket), shared with the app's container.
    {{- include "tokengate.socketMount" . | nindent 4 }}
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
{{- if .Values.upstreamSocket }}
- name: tokengate-socket
  emptyDir: {}
{{- end }}
{{- end }}


{{/*
A TOML basic string. JSON string escapes (\" \\ \n \uXXXX ...) are valid TOML escapes.
*/}}
{{- define "tokengate.str" -}}
{{- . | toString | toJson }}
{{- end }}

{{/*
A TOML value for a string, a boolean, a whole number or a list of strings.
*/}}
{{- define "tokengate.value" -}}
{{- if kindIs "string" . }}{{ include "tokengate.str" . }}
{{- else if kindIs "bool" . }}{{ . }}
{{- else if kindIs "slice" . }}{{ . | toJson }}
{{- else }}{{ . | int64 }}
{{- end }}
{{- end }}

{{/*
One [[route]] table. Called with (dict "route" MAP "upstream" DEFAULT_UPSTREAM ["pathPrefix" P]).
Keys are those of [[route]] (docs/reference.md), in camelCase; values.schema.json has already refused
unknown keys, wrong types and missing required keys.
*/}}
{{- define "tokengate.route" -}}
{{- $r := .route }}
[[route]]
path_prefix = {{ include "tokengate.str" (default $r.pathPrefix .pathPrefix) }}
upstream = {{ include "tokengate.str" (default .upstream $r.upstream) }}
{{- $toml := dict "auth" "auth" "preserveHost" "preserve_host" "timeout" "timeout" "upstreamCa" "upstream_ca" "upgrades" "upgrades" "maxInflight" "max_inflight" "maxIdleConnections" "max_idle_connections" "preserveHeaderCase" "preserve_header_case" "preflight" "preflight" }}
{{- range $k := list "auth" "preserveHost" "timeout" "upstreamCa" "upgrades" "maxInflight" "maxIdleConnections" "preserveHeaderCase" "preflight" }}
{{- if and (hasKey $r $k) (not (kindIs "invalid" (get $r $k))) (or (ne $k "upstreamCa") (get $r $k)) }}
{{ get $toml $k }} = {{ include "tokengate.value" (get $r $k) }}
{{- end }}
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
{{- range $r.rateLimits }}
[[route.rate_limit]]
per = {{ include "tokengate.str" .per }}
rate = {{ include "tokengate.str" .rate }}
{{- if and (hasKey . "burst") (not (kindIs "invalid" .burst)) }}
burst = {{ .burst | int64 }}
{{- end }}
{{- end }}
{{- range $kind := list "deny" "allow" }}
{{- range (get $r $kind | default list) }}
[[route.{{ $kind }}]]
{{- include "tokengate.rule" . }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The keys of one [[route.deny]] / [[route.allow]] rule (values.schema.json has already refused
unknown keys and wrong types): the lists of strings as they are, claims as an inline table of
claim path -> a value or a list of them.
*/}}
{{- define "tokengate.rule" }}
{{- $rule := . }}
{{- range $k := list "methods" "paths" "subjects" "accounts" "groups" "scopes" "sources" "clients" }}
{{- if and (hasKey $rule $k) (not (kindIs "invalid" (get $rule $k))) }}
{{ $k }} = {{ get $rule $k | toJson }}
{{- end }}
{{- end }}
{{- with $rule.claims }}
{{- $claims := list }}
{{- range $path, $value := . }}
{{- $claims = append $claims (printf "%s = %s" (include "tokengate.str" $path) (include "tokengate.claimValue" $value)) }}
{{- end }}
claims = { {{ join ", " $claims }} }
{{- end }}
{{- end }}

{{/*
A claim's value in a rule: a string, a boolean, a whole number, or a list of them.
*/}}
{{- define "tokengate.claimValue" -}}
{{- if kindIs "slice" . }}
{{- $items := list }}
{{- range . }}{{ $items = append $items (include "tokengate.claimValue" .) }}{{ end }}
{{- printf "[%s]" (join ", " $items) }}
{{- else if kindIs "string" . }}{{ include "tokengate.str" . }}
{{- else if kindIs "bool" . }}{{ . }}
{{- else }}{{ . | int64 }}
{{- end }}
{{- end }}

{{/*
One [[validator]] table. Called with (dict "v" MAP); values.schema.json has already checked the
type and the keys allowed for it.
*/}}
{{- define "tokengate.validator" -}}
{{- $v := .v }}
{{- $type := $v.type }}
{{- $keys := get (dict "static" (list "type" "tokens") "introspect" (list "type" "url" "header" "value" "subject" "account" "groups" "scopes" "timeout" "maxConcurrent") "jwt" (list "type" "issuer" "audience" "groupsClaim" "jwksUrl" "publicKey" "secret" "subjectClaim" "timeout") "oauth2_introspection" (list "type" "url" "clientId" "clientSecret" "audience" "issuer" "subjectClaim" "groupsClaim" "timeout" "maxConcurrent")) $type }}
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
{{- with .groups }}
groups = {{ . | toJson }}
{{- end }}
{{- with .scopes }}
scopes = {{ . | toJson }}
{{- end }}
{{- end }}
{{- else }}
{{- $toml := dict "url" "url" "header" "header" "value" "value" "subject" "subject" "account" "account" "groups" "groups" "scopes" "scopes" "timeout" "timeout" "maxConcurrent" "max_concurrent" "issuer" "issuer" "audience" "audience" "groupsClaim" "groups_claim" "jwksUrl" "jwks_url" "publicKey" "public_key" "secret" "secret" "subjectClaim" "subject_claim" "clientId" "client_id" "clientSecret" "client_secret" }}
{{- range $k := $keys }}
{{- if and (ne $k "type") (hasKey $v $k) (not (kindIs "invalid" (get $v $k))) }}
{{ get $toml $k }} = {{ include "tokengate.value" (get $v $k) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The tokengate config file (docs/reference.md): configFile as it is, or the config rendered from values
and config.extraToml after it. Its sha256 is the pod template's checksum/config annotation, so a
config change rolls the pods.
*/}}
{{- define "tokengate.config" -}}
{{- if .Values.configFile }}
{{- regexReplaceAll "\\s+$" .Values.configFile "" }}
{{- else }}
{{- include "tokengate.chartConfig" . }}
{{- with .Values.config.extraToml }}

{{ regexReplaceAll "\\s+$" . "" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The part of the config the chart renders from values (all but config.extraToml).
*/}}
{{- define "tokengate.chartConfig" -}}
{{- $c := .Values.config -}}
# tokengate config rendered by the Helm chart {{ include "tokengate.chart" . }} from its values.
# Keys: docs/reference.md and README.md. Check a copy with `tokengate check --config FILE`.

[server]
listen = {{ include "tokengate.str" (printf "0.0.0.0:%d" (int .Values.tokengate.port)) }}
max_header_bytes = {{ $c.server.maxHeaderBytes | int64 }}
max_body_bytes = {{ include "tokengate.str" $c.server.maxBodyBytes }}
header_read_timeout = {{ include "tokengate.str" $c.server.headerReadTimeout }}
idle_timeout = {{ include "tokengate.str" $c.server.idleTimeout }}
body_read_timeout = {{ include "tokengate.str" $c.server.bodyReadTimeout }}
max_connections = {{ $c.server.maxConnections | int64 }}
max_concurrent_streams = {{ $c.server.maxConcurrentStreams | int64 }}
{{- if $c.server.workers }}
workers = {{ $c.server.workers | int64 }}
{{- end }}
allow_underscores_in_headers = {{ $c.server.allowUnderscoresInHeaders }}
{{- with $c.server.stripHeaders }}
strip_headers = {{ . | toJson }}
{{- end }}
{{- with $c.server.trustedProxies }}
trusted_proxies = {{ . | toJson }}
{{- end }}
drain_timeout = {{ include "tokengate.str" $c.server.drainTimeout }}
{{- if .Values.tls.enabled }}

[server.tls]
{{- include "tokengate.tlsFiles" . }}
{{- if .Values.tls.clientCaSecretName }}
client_auth = {{ include "tokengate.str" .Values.tls.clientAuth }}
{{- end }}
proxy_certificates = {{ .Values.tls.proxyCertificates }}
alpn = {{ .Values.tls.alpn | toJson }}
{{- end }}

[admin]
listen = {{ include "tokengate.str" (printf "0.0.0.0:%d" (int .Values.admin.port)) }}
{{- if .Values.admin.tokenSecretName }}
token = "${env:TOKENGATE_ADMIN_TOKEN}"
{{- end }}
{{- if .Values.verify.enabled }}

[verify]
listen = {{ include "tokengate.str" (printf "0.0.0.0:%d" (int .Values.verify.port)) }}
ingress = {{ include "tokengate.str" .Values.verify.ingress }}
{{- if .Values.verify.tokenSecretName }}
token = "${env:TOKENGATE_VERIFY_TOKEN}"
{{- end }}
{{- if .Values.verify.tls }}

[verify.tls]
{{- include "tokengate.tlsFiles" . }}
{{- end }}
{{- end }}

[endpoints]
tokens_prefix = {{ include "tokengate.str" $c.endpoints.tokensPrefix }}
self_service = {{ $c.endpoints.selfService }}
page = {{ $c.endpoints.page }}
{{- with $c.endpoints.loginUrl }}
login_url = {{ include "tokengate.str" . }}
{{- end }}
insight = {{ $c.endpoints.insight }}

[credentials]
sources = {{ $c.credentials.sources | toJson }}
{{- with $c.credentials.keep }}
keep = {{ . | toJson }}
{{- end }}

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
{{- with .Values.store.redis.prefix }}
prefix = {{ include "tokengate.str" . }}
{{- end }}
{{- end }}

[tokens]
default_ttl = {{ include "tokengate.str" $c.tokens.defaultTtl }}
max_ttl = {{ include "tokengate.str" $c.tokens.maxTtl }}
format = {{ include "tokengate.str" $c.tokens.format }}
{{- with $c.tokens.jwtKey }}
jwt_key = {{ include "tokengate.str" . }}
{{- end }}
{{- with $c.tokens.scopes }}
scopes = {{ . | toJson }}
{{- end }}
{{- if and (hasKey $c.tokens "loginScopes") (not (kindIs "invalid" $c.tokens.loginScopes)) }}
login_scopes = {{ $c.tokens.loginScopes | toJson }}
{{- end }}

[limits]
failed_auth = {{ include "tokengate.str" $c.limits.failedAuth }}
failed_auth_burst = {{ $c.limits.failedAuthBurst | int64 }}
max_tracked = {{ $c.limits.maxTracked | int64 }}
shared = {{ $c.limits.shared }}
{{- if $c.x509.enabled }}

[x509]
enabled = true
token_ttl = {{ include "tokengate.str" $c.x509.tokenTtl }}
dn_format = {{ include "tokengate.str" $c.x509.dnFormat }}
{{- range $c.x509.identities }}

[[x509.identity]]
dn = {{ include "tokengate.str" .dn }}
accounts = {{ .accounts | toJson }}
{{- end }}
{{- end }}
{{- range $v := $c.validators }}

{{ include "tokengate.validator" (dict "v" $v) | trim }}
{{- end }}

{{ include "tokengate.route" (dict "route" $c.route "pathPrefix" (default "/" $c.route.pathPrefix) "upstream" (include "tokengate.appUpstream" .)) | trim }}
{{- range $r := $c.extraRoutes }}

{{ include "tokengate.route" (dict "route" $r "upstream" (include "tokengate.appUpstream" $)) | trim }}
{{- end }}
{{- end }}

{{/*
cert, key and client_ca of [server.tls] / [verify.tls]: the files of the Secrets the chart
mounts.
*/}}
{{- define "tokengate.tlsFiles" }}
cert = {{ include "tokengate.str" (printf "%s/tls.crt" (include "tokengate.tlsDir" .)) }}
key = {{ include "tokengate.str" (printf "%s/tls.key" (include "tokengate.tlsDir" .)) }}
{{- if .Values.tls.clientCaSecretName }}
client_ca = {{ include "tokengate.str" (include "tokengate.clientCaFile" .) }}
{{- end }}
{{- end }}

{{- define "tokengate.clientCaFile" -}}
{{ include "tokengate.clientCaDir" . }}/{{ .Values.tls.clientCaKey }}
{{- end }}

{{/*
Reads a TOML text as far as the chart's checks need, and fails where `tokengate check` would
refuse a table defined twice (or a table that is also an array of tables). Called with
(dict "text" TEXT "source" NAME "state" STATE); STATE, shared by the calls for one config file,
collects "tables" (standard tables defined so far, for the current element of each array of
tables: name -> {source, line}), "arrays" (arrays of tables), "values" ("table.key" -> the value
of a one-line `key = "string"`, or its raw text), "env" (the NAMEs of ${env:NAME}) and
"current" (the standard table the lines belong to). Comments and multi-line strings are skipped.
*/}}
{{- define "tokengate.scanToml" -}}
{{- $st := .state }}
{{- $source := .source }}
{{- $multiline := false }}
{{- range $i, $line := splitList "\n" .text }}
{{- $lineNo := add1 $i }}
{{- $quotes := len (regexFindAll `"""|'''` $line -1) }}
{{- if $multiline }}
{{- if mod $quotes 2 }}{{ $multiline = false }}{{ end }}
{{- else }}
{{- $code := trim (regexReplaceAll `^((?:[^#"']|"(?:[^"\\]|\\.)*"|'[^']*')*)#.*$` $line "${1}") }}
{{- if mod $quotes 2 }}{{ $multiline = true }}{{ end }}
{{- range $ref := regexFindAll `\$\{env:[A-Za-z_][A-Za-z0-9_]*\}` $code -1 }}
{{- $_ := set $st.env (trimSuffix "}" (trimPrefix "${env:" $ref)) true }}
{{- end }}
{{- if regexMatch `^\[\[.*\]\]$` $code }}
{{- $name := regexReplaceAll `\s*\.\s*` (regexReplaceAll `^\[\[\s*(.*?)\s*\]\]$` $code "${1}") "." }}
{{- if hasKey $st.tables $name }}
{{- fail (printf "%s line %d: [[%s]] names a table that is already defined, not an array of tables (tokengate check refuses it)" $source $lineNo $name) }}
{{- end }}
{{- $_ := set $st.arrays $name true }}
{{- /* A new element of the array: its sub-tables are defined afresh. */}}
{{- range $t := keys $st.tables }}
{{- if hasPrefix (printf "%s." $name) $t }}{{ $_ := unset $st.tables $t }}{{ end }}
{{- end }}
{{- $_ := set $st "current" "" }}
{{- else if regexMatch `^\[[^\[].*\]$` $code }}
{{- $name := regexReplaceAll `\s*\.\s*` (regexReplaceAll `^\[\s*(.*?)\s*\]$` $code "${1}") "." }}
{{- if hasKey $st.arrays $name }}
{{- fail (printf "%s line %d: [%s] is already an array of tables ([[%s]]); tokengate check refuses it" $source $lineNo $name $name) }}
{{- end }}
{{- with get $st.tables $name }}
{{- if eq .source "chart" }}
{{- $values := dict "server" "config.server" "server.tls" "tls" "admin" "admin" "verify" "verify" "verify.tls" "verify.tls" "endpoints" "config.endpoints" "credentials" "config.credentials" "cache" "config.cache" "store" "store" "tokens" "config.tokens" "x509" "config.x509" "limits" "config.limits" "route.upstream_auth" "config.route.upstreamAuth (or extraRoutes)" "route.identity_headers" "config.route.identityHeaders (or extraRoutes)" }}
{{- fail (printf "%s line %d: table [%s] is already in the config the chart renders, and tokengate check refuses a table defined twice: set it through the values %s instead" $source $lineNo $name (get $values $name | default "of the chart")) }}
{{- end }}
{{- fail (printf "%s line %d: table [%s] is defined twice (first on line %d); tokengate check refuses it" $source $lineNo $name (int .line)) }}
{{- end }}
{{- $_ := set $st.tables $name (dict "source" $source "line" $lineNo) }}
{{- $_ := set $st "current" $name }}
{{- else if regexMatch `^[A-Za-z0-9_.-]+\s*=` $code }}
{{- $key := regexReplaceAll `^([A-Za-z0-9_.-]+)\s*=.*$` $code "${1}" }}
{{- $raw := regexReplaceAll `^[A-Za-z0-9_.-]+\s*=\s*` $code "" }}
{{- $value := $raw }}
{{- if regexMatch `^"(?:[^"\\]|\\.)*"$` $raw }}
{{- $value = regexReplaceAll `^"(.*)"$` $raw "${1}" }}
{{- else if regexMatch `^'[^']*'$` $raw }}
{{- $value = regexReplaceAll `^'(.*)'$` $raw "${1}" }}
{{- end }}
{{- $path := ternary $key (printf "%s.%s" $st.current $key) (eq $st.current "") }}
{{- $_ := set $st.values $path $value }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Every ${env:NAME} of the config must be a variable of the tokengate container: tokengate refuses
to start on one that is unset. Called with (dict "state" STATE "Values" .Values "source" NAME).
*/}}
{{- define "tokengate.checkEnv" -}}
{{- $have := dict "RUST_LOG" true }}
{{- if .Values.admin.tokenSecretName }}{{ $_ := set $have "TOKENGATE_ADMIN_TOKEN" true }}{{ end }}
{{- if and .Values.verify.enabled .Values.verify.tokenSecretName }}{{ $_ := set $have "TOKENGATE_VERIFY_TOKEN" true }}{{ end }}
{{- if eq .Values.store.backend "redis" }}{{ $_ := set $have "TOKENGATE_REDIS_URL" true }}{{ end }}
{{- range .Values.tokengate.extraEnv }}{{ $_ := set $have .name true }}{{ end }}
{{- range $name := keys .state.env | sortAlpha }}
{{- if not (hasKey $have $name) }}
{{- fail (printf "%s refers to ${env:%s}, which the tokengate container does not have (tokengate refuses to start): add it to tokengate.extraEnv, e.g. from a Secret with valueFrom.secretKeyRef" $.source $name) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
configFile: the file must fit the pod the chart builds around it (ports, mounted files, store
volume, environment), and config.* must be left at its defaults (it is not used). Each mismatch
fails the render with what to change, rather than becoming a pod that cannot start or never
gets ready.
*/}}
{{- define "tokengate.checkConfigFile" -}}
{{- $changed := include "tokengate.changedValues" (dict "value" .Values.config "default" (include "tokengate.configDefaults" . | fromYaml) "path" "config") | trim }}
{{- if $changed }}
{{- fail (printf "configFile is the whole tokengate config, so the config.* values are not used, but these are set: %s. Put them in the file, or leave them unset" (splitList "\n" $changed | join ", ")) }}
{{- end }}
{{- $st := dict "tables" (dict) "arrays" (dict) "values" (dict) "env" (dict) "current" "" }}
{{- include "tokengate.scanToml" (dict "text" .Values.configFile "source" "configFile" "state" $st) }}
{{- $v := $st.values }}
{{- include "tokengate.checkListen" (dict "key" "[server] listen" "listen" (get $v "server.listen" | default "0.0.0.0:8443") "port" .Values.tokengate.port "value" "tokengate.port" "why" "the Service and the container port tokengate") }}
{{- if not (hasKey $v "admin.listen") }}
{{- fail (printf "configFile has no [admin] listen: the chart's liveness and readiness probes and the metrics scrape use admin.port (%d) on the pod IP: add [admin] listen = \"0.0.0.0:%d\"" (int .Values.admin.port) (int .Values.admin.port)) }}
{{- end }}
{{- include "tokengate.checkListen" (dict "key" "[admin] listen" "listen" (get $v "admin.listen") "port" .Values.admin.port "value" "admin.port" "why" "the probes and the metrics scrape") }}
{{- if .Values.verify.enabled }}
{{- if not (hasKey $v "verify.listen") }}
{{- fail (printf "verify.enabled exposes the decision port %d, but configFile has no [verify] listen: add [verify] listen = \"0.0.0.0:%d\"" (int .Values.verify.port) (int .Values.verify.port)) }}
{{- end }}
{{- include "tokengate.checkListen" (dict "key" "[verify] listen" "listen" (get $v "verify.listen") "port" .Values.verify.port "value" "verify.port" "why" "the Service port verify") }}
{{- end }}
{{- /* TLS: the only files in the container are the Secrets the chart mounts. */}}
{{- $files := dict "cert" (printf "%s/tls.crt" (include "tokengate.tlsDir" .)) "key" (printf "%s/tls.key" (include "tokengate.tlsDir" .)) "client_ca" (include "tokengate.clientCaFile" .) }}
{{- range $table := list "server.tls" "verify.tls" }}
{{- $present := or (hasKey $st.tables $table) (hasKey $v (printf "%s.cert" $table)) }}
{{- $wanted := ternary $.Values.tls.enabled (and $.Values.verify.enabled $.Values.verify.tls) (eq $table "server.tls") }}
{{- if and $wanted (not $present) }}
{{- fail (printf "%s mounts the certificate, but configFile has no [%s]: add cert = %s and key = %s" (ternary "tls.enabled" "verify.tls" (eq $table "server.tls")) $table (get $files "cert" | quote) (get $files "key" | quote)) }}
{{- end }}
{{- range $key := list "cert" "key" "client_ca" }}
{{- $path := get $v (printf "%s.%s" $table $key) }}
{{- if $path }}
{{- $mounted := ternary $.Values.tls.clientCaSecretName $.Values.tls.secretName (eq $key "client_ca") }}
{{- if not (and $.Values.tls.enabled $mounted) }}
{{- fail (printf "configFile [%s] %s = %s, but the tokengate container has no such file: set %s (the chart mounts it at %s)" $table $key ($path | quote) (ternary "tls.clientCaSecretName" "tls.enabled and tls.secretName" (eq $key "client_ca")) (get $files $key)) }}
{{- end }}
{{- if ne $path (get $files $key) }}
{{- fail (printf "configFile [%s] %s = %s: the file the chart mounts is %s" $table $key ($path | quote) (get $files $key | quote)) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- /* The store: the chart provides the sqlite volume or the redis URL by store.backend. */}}
{{- $backend := get $v "store.backend" | default "sqlite" }}
{{- if ne $backend .Values.store.backend }}
{{- fail (printf "configFile [store] backend is %s%s, but store.backend is %s, which decides the volume or the redis URL the chart provides: set store.backend=%s" ($backend | quote) (ternary "" " (tokengate's default)" (hasKey $v "store.backend")) (.Values.store.backend | quote) $backend) }}
{{- end }}
{{- if eq $backend "sqlite" }}
{{- $path := get $v "store.path" | default "tokengate.db" }}
{{- if not (hasPrefix (printf "%s/" (include "tokengate.dataDir" .)) $path) }}
{{- fail (printf "configFile [store] path is %s%s: the sqlite file must be on the chart's data volume, e.g. path = \"%s/tokengate.db\" (a relative path is in %s, the read-only ConfigMap)" ($path | quote) (ternary "" " (tokengate's default)" (hasKey $v "store.path")) (include "tokengate.dataDir" .) (include "tokengate.configDir" .)) }}
{{- end }}
{{- end }}
{{- /* The app's socket: only the folder upstreamSocket names is shared with the app. */}}
{{- $sockets := regexFindAll `"unix:[^"]*"` .Values.configFile -1 | uniq }}
{{- range $s := $sockets }}
{{- $path := trimSuffix "\"" (trimPrefix "\"unix:" $s) }}
{{- if not $.Values.upstreamSocket }}
{{- fail (printf "configFile has upstream = %s, but upstreamSocket is not set: set upstreamSocket=%s, so that the socket's folder is shared with your app's container" $s $path) }}
{{- end }}
{{- if ne (dir $path) (include "tokengate.socketDir" $) }}
{{- fail (printf "configFile has upstream = %s, which is not in the folder of upstreamSocket (%s), the only one the containers share" $s (include "tokengate.socketDir" $)) }}
{{- end }}
{{- end }}
{{- if and .Values.upstreamSocket (not (has (printf "\"unix:%s\"" .Values.upstreamSocket) $sockets)) }}
{{- fail (printf "upstreamSocket is %s, but no route of configFile goes there: upstream = \"unix:%s\"" .Values.upstreamSocket .Values.upstreamSocket) }}
{{- end }}
{{- include "tokengate.checkEnv" (dict "state" $st "Values" .Values "source" "configFile") }}
{{- end }}

{{/*
A listen address of configFile: on the port the chart exposes, not on loopback (kubelet and the
Service reach the pod IP). Called with (dict "key" "[server] listen" "listen" ADDR "port" PORT
"value" VALUE_NAME "why" WHAT_USES_IT).
*/}}
{{- define "tokengate.checkListen" -}}
{{- $port := regexReplaceAll `^.*:([0-9]+)$` .listen "${1}" }}
{{- $host := regexReplaceAll `^(.*):[0-9]+$` .listen "${1}" }}
{{- if or (ne $port (toString (int .port))) (regexMatch `^(127\.|\[::1\]$|localhost$)` $host) }}
{{- fail (printf "configFile %s = %s: %s reach %s (%d) on the pod IP: listen = \"0.0.0.0:%d\"" .key (.listen | quote) .why .value (int .port) (int .port)) }}
{{- end }}
{{- end }}

{{/*
The config.* values that differ from configDefaults, one path a line. Called with
(dict "value" V "default" D "path" P).
*/}}
{{- define "tokengate.changedValues" -}}
{{- if and (kindIs "map" .value) (kindIs "map" .default) }}
{{- range $k := concat (keys .value) (keys .default) | uniq | sortAlpha }}
{{- include "tokengate.changedValues" (dict "value" (get $.value $k) "default" (get $.default $k) "path" (printf "%s.%s" $.path $k)) }}
{{- end }}
{{- else if ne (toJson .value) (toJson .default) }}
{{ .path }}
{{- end }}
{{- end }}

{{/*
The defaults of config.* in values.yaml, so that configFile can tell a value that was set from
one left alone (tests/helm.rs checks the two agree).
*/}}
{{- define "tokengate.configDefaults" }}
server:
  maxHeaderBytes: 16384
  maxBodyBytes: "0"
  headerReadTimeout: 10s
  idleTimeout: 60s
  bodyReadTimeout: 30s
  maxConnections: 10000
  maxConcurrentStreams: 100
  workers: 0
  allowUnderscoresInHeaders: false
  stripHeaders: []
  trustedProxies: []
  drainTimeout: 30s
endpoints:
  tokensPrefix: /_tokengate
  selfService: true
  page: false
  loginUrl: ""
  insight: false
credentials:
  sources: [bearer, x-auth-token, auth-token, rucio]
  keep: []
cache:
  ttl: 1h
  negativeTtl: 10s
  maxEntries: 1000000
tokens:
  defaultTtl: 90d
  maxTtl: 365d
  format: opaque
  jwtKey: ""
  scopes: []
validators: []
route:
  pathPrefix: /
  auth: required
  preserveHost: true
  timeout: 60s
  upgrades: [websocket]
  maxInflight: 1024
  maxIdleConnections: 64
  preserveHeaderCase: true
  upstreamAuth:
    header: auth-token
    value: "{token}"
  identityHeaders:
    X-Auth-User: "{subject}"
    X-Auth-Account: "{account}"
  preflight: authenticate
  rateLimits: []
  deny: []
  allow: []
extraRoutes: []
limits:
  failedAuth: 20/1m
  failedAuthBurst: 10
  maxTracked: 100000
  shared: false
x509:
  enabled: false
  tokenTtl: 1h
  dnFormat: slash
  identities: []
extraToml: ""
{{- end }}

{{/*
mode=sidecar: a strategic-merge patch for the existing Deployment sidecar.deployment in the
release's namespace (kustomize finds a patch's target by kind, name and namespace). Lists of
containers and volumes merge by name, so the patch adds the tokengate container and its volumes
beside the app's and changes nothing else of the app. The app's container comes first in the
patch, with its name only (nothing of it changes): a container the patch adds would otherwise
go first (kubectl patch and kustomize both put new items before the existing ones), and tools
that take "the first container" would take tokengate.
*/}}
{{- define "tokengate.deploymentPatch" -}}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ .Values.sidecar.deployment }}
  namespace: {{ .Release.Namespace }}
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
        # Your app's container: named here so that it stays first. Nothing of it changes, but
        # with upstreamSocket the socket's folder is mounted into it (volumeMounts merge by
        # mountPath: its own mounts stay).
        - name: {{ .Values.sidecar.container }}
          {{- if .Values.upstreamSocket }}
          volumeMounts:
            {{- include "tokengate.socketMount" . | nindent 12 }}
          {{- end }}
        {{- include "tokengate.container" . | nindent 8 }}
      volumes:
        {{- include "tokengate.volumes" . | nindent 8 }}
{{- end }}

{{/*
mode=sidecar with sidecar.service: a strategic-merge patch that aims the Service's port
service.port at tokengate (the API server merges ports by port number, kustomize by port and
protocol as written: hence protocol TCP, what the API server defaults it to; the name stays), and
adds the decision port with verify.enabled.
*/}}
{{- define "tokengate.servicePatch" -}}
apiVersion: v1
kind: Service
metadata:
  name: {{ .Values.sidecar.service }}
  namespace: {{ .Release.Namespace }}
spec:
  ports:
    - port: {{ int .Values.service.port }}
      protocol: TCP
      targetPort: {{ int .Values.tokengate.port }}
    {{- if .Values.verify.enabled }}
    - name: tokengate-verify
      port: {{ int .Values.verify.port }}
      targetPort: {{ int .Values.verify.port }}
      protocol: TCP
    {{- end }}
{{- end }}
