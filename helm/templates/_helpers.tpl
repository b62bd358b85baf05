{{/*
Chart name.
*/}}
{{- define "kv-responder.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Resource base name, from the release so two tenants in one namespace never
collide. At most 52 characters, leaving room for the "-headless" suffix; a
longer name is shortened with a hash so that it stays unique.
*/}}
{{- define "kv-responder.fullname" -}}
{{- $full := "" }}
{{- if .Values.fullnameOverride }}
{{- $full = .Values.fullnameOverride }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- $full = .Release.Name }}
{{- else }}
{{- $full = printf "%s-%s" .Release.Name $name }}
{{- end }}
{{- end }}
{{- if gt (len $full) 52 }}
{{- $full = printf "%s-%s" ($full | trunc 43 | trimSuffix "-") ($full | sha256sum | trunc 8) }}
{{- end }}
{{- /* Helm takes release names a Service cannot have (a leading digit, a dot): refused here, not by the API
       server halfway through an install. */}}
{{- if .Values.monitoringOnly }}
{{- /* A ConfigMap's or a PrometheusRule's name is a DNS subdomain: dots and a leading digit are fine. */}}
{{- if not (regexMatch "^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$" $full) }}
{{- fail (printf "the resource names would start with %q, which is not a DNS subdomain: choose another release name or set fullnameOverride" $full) }}
{{- end }}
{{- else if not (regexMatch "^[a-z]([-a-z0-9]*[a-z0-9])?$" $full) }}
{{- fail (printf "the resource names would start with %q, which is not a DNS-1035 label (lower-case letters, digits and '-', starting with a letter): Kubernetes would refuse the Services; choose another release name or set fullnameOverride" $full) }}
{{- else if hasSuffix "-headless" $full }}
{{- fail (printf "the resource names would start with %q, which ends in -headless: its Service would have the name of the headless Service of a release named %q in the same namespace; choose another release name or set fullnameOverride" $full (trimSuffix "-headless" $full)) }}
{{- end }}
{{- $full }}
{{- end }}

{{- define "kv-responder.headlessName" -}}
{{- printf "%s-headless" (include "kv-responder.fullname" .) }}
{{- end }}

{{/*
The tenant: .Values.tenant, or else the release name without a leading
"kv-responder-". Either way it must be a DNS label of at most 40 characters.
*/}}
{{- define "kv-responder.tenant" -}}
{{- $raw := .Values.tenant }}
{{- /* A number from a values file is YAML's reading of the digits, not the digits (0777 is 511, 1e3 is 1000):
       only --set passes whole numbers as written (int64), and "default" would take 0 for unset. */}}
{{- if kindIs "float64" $raw }}
{{- fail (printf "tenant %v is a number in a values file: quote it (YAML reads unquoted digits as a number: 0777 as 511, 0x1f as 31, 1e3 as 1000)" $raw) }}
{{- end }}
{{- $tenant := "" }}
{{- if not (kindIs "invalid" $raw) }}
{{- $tenant = toString $raw }}
{{- end }}
{{- $derived := false }}
{{- if not $tenant }}
{{- $tenant = trimPrefix "kv-responder-" .Release.Name }}
{{- $derived = true }}
{{- end }}
{{- if or (gt (len $tenant) 40) (not (regexMatch "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$" $tenant)) }}
{{- if $derived }}
{{- fail (printf "tenant is not set and cannot be derived from the release name %q (%q is not a DNS label of at most 40 characters [a-z0-9-]): set it with --set tenant=<name>" .Release.Name $tenant) }}
{{- else }}
{{- fail (printf "tenant %q is invalid: it must be a DNS label of at most 40 characters [a-z0-9-], starting and ending with a letter or digit" $tenant) }}
{{- end }}
{{- end }}
{{- $tenant }}
{{- end }}

{{- define "kv-responder.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kv-responder.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kv-responder.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "kv-responder.labels" -}}
helm.sh/chart: {{ include "kv-responder.chart" . }}
{{ include "kv-responder.selectorLabels" . }}
{{- /* A label value takes [-A-Za-z0-9_.] only: a tag pinned by digest (0.1.0@sha256:...) keeps its readable part. */}}
{{- $version := regexReplaceAll "@.*$" (toString (default .Chart.AppVersion .Values.image.tag)) "" }}
app.kubernetes.io/version: {{ regexReplaceAll "[^-A-Za-z0-9_.]" $version "_" | trunc 63 | trimAll "-_." | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kv-responder
{{- if not .Values.monitoringOnly }}
kv-responder/tenant: {{ include "kv-responder.tenant" . }}
{{- end }}
{{- end }}

{{/*
Labels of the pods, and of same-tenant peers in the NetworkPolicy.
*/}}
{{- define "kv-responder.peerLabels" -}}
{{ include "kv-responder.selectorLabels" . }}
ingress-group: {{ include "kv-responder.tenant" . }}
{{- end }}

{{/*
Multicast group, derived from the tenant exactly as the service does
(docs/CONTRACT.md): a = adler32(tenant), x = 1 + (a >> 16) % 254,
y = 1 + (a & 0xffff) % 254, group 239.255.x.y. discovery.group overrides it.
*/}}
{{- define "kv-responder.discoveryGroup" -}}
{{- if .Values.discovery.group }}
{{- .Values.discovery.group }}
{{- else }}
{{- $a := include "kv-responder.tenant" . | adler32sum | int64 }}
{{- printf "239.255.%d.%d" (add1 (mod (div $a 65536) 254)) (add1 (mod (mod $a 65536) 254)) }}
{{- end }}
{{- end }}

{{- define "kv-responder.discoveryUsesDNS" -}}
{{- if has .Values.discovery.mode (list "dns" "both") }}true{{ end }}
{{- end }}

{{- define "kv-responder.discoveryUsesMulticast" -}}
{{- if has .Values.discovery.mode (list "multicast" "both") }}true{{ end }}
{{- end }}

{{- define "kv-responder.discoveryDNS" -}}
{{- printf "%s.%s.svc.%s" (include "kv-responder.headlessName" .) .Release.Namespace .Values.clusterDomain }}
{{- end }}

{{/*
Bytes in a Kubernetes quantity (plain number, or Ki/Mi/Gi/Ti, k/K/M/G/T).
*/}}
{{- define "kv-responder.quantityBytes" -}}
{{- $q := . }}
{{- if or (kindIs "float64" $q) (kindIs "int" $q) (kindIs "int64" $q) }}
{{- int64 $q }}
{{- else }}
{{- $s := trim (toString $q) }}
{{- $units := dict "" 1 "Ki" 1024 "Mi" 1048576 "Gi" 1073741824 "Ti" 1099511627776 "k" 1000 "K" 1000 "M" 1000000 "G" 1000000000 "T" 1000000000000 }}
{{- $num := regexFind "^[0-9]+(\\.[0-9]+)?" $s }}
{{- $suffix := trimPrefix $num $s }}
{{- if or (not $num) (not (hasKey $units $suffix)) }}
{{- fail (printf "cannot read the memory quantity %q: use a number of bytes or a Ki/Mi/Gi/Ti or K/M/G/T suffix" $s) }}
{{- end }}
{{- if contains "." $num }}
{{- mulf (float64 $num) (get $units $suffix) | floor | int64 }}
{{- else }}
{{- mul (int64 $num) (get $units $suffix) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Seconds in a Prometheus duration ("30s", "1m30s", "500ms"); fails the render, naming the value, otherwise.
(dict "name" <the value's name> "value" <the duration>)
*/}}
{{- define "kv-responder.durationSeconds" -}}
{{- $text := toString .value }}
{{- if not (regexMatch "^([0-9]+(ms|s|m|h|d|w|y))+$" $text) }}
{{- fail (printf "%s (%q) is not a Prometheus duration such as 30s or 1m" .name $text) }}
{{- end }}
{{- $units := dict "ms" 0.001 "s" 1.0 "m" 60.0 "h" 3600.0 "d" 86400.0 "w" 604800.0 "y" 31536000.0 }}
{{- $total := 0.0 }}
{{- range regexFindAll "[0-9]+(ms|s|m|h|d|w|y)" $text -1 }}
{{- $unit := regexFind "(ms|s|m|h|d|w|y)$" . }}
{{- $total = addf $total (mulf (float64 (trimSuffix $unit .)) (get $units $unit)) }}
{{- end }}
{{- $total }}
{{- end }}

{{/*
A value as an environment variable's text, as the node reads it: a number
from a values file arrives as a float64, and a whole one of a million or
more would print as 2.097152e+06. A fraction stays as it is (0.5).
*/}}
{{- define "kv-responder.envText" -}}
{{- if and (kindIs "float64" .) (eq (float64 (int64 .)) .) }}{{ printf "%d" (int64 .) }}{{ else }}{{ toString . }}{{ end }}
{{- end }}

{{/*
A size of config (dict "name" "maxValueSize" "value" <the value> "least" <bytes>), refused below the least the
node takes, as the node would at start. The schema's minimum applies to numbers only: "32" is a string.
*/}}
{{- define "kv-responder.sizeAtLeast" -}}
{{- if lt (include "kv-responder.quantityBytes" .value | int64) (int64 .least) }}
{{- fail (printf "config.%s (%v) must be at least %d bytes: the node would refuse to start" .name .value (int64 .least)) }}
{{- end }}
{{- end }}

{{/*
MAX_VALUE_SIZE: config.maxValueSize, at least 64 bytes.
*/}}
{{- define "kv-responder.maxValueSize" -}}
{{- include "kv-responder.sizeAtLeast" (dict "name" "maxValueSize" "value" .Values.config.maxValueSize "least" 64) }}
{{- include "kv-responder.envText" .Values.config.maxValueSize }}
{{- end }}

{{/*
MAX_MEMORY: config.maxMemory, or else config.maxMemoryPercent of the memory
limit in bytes (the rest is headroom for the interpreter and buffers), or
else nothing (the service default). At least 64Ki, and below the memory
limit: a store allowed the whole limit is killed before it evicts.
*/}}
{{- define "kv-responder.maxMemory" -}}
{{- $limit := dig "limits" "memory" "" (.Values.resources | default dict) }}
{{- if .Values.config.maxMemory }}
{{- include "kv-responder.sizeAtLeast" (dict "name" "maxMemory" "value" .Values.config.maxMemory "least" 65536) }}
{{- if $limit }}
{{- if ge (include "kv-responder.quantityBytes" .Values.config.maxMemory | int64) (include "kv-responder.quantityBytes" $limit | int64) }}
{{- fail (printf "config.maxMemory (%v) must be below the memory limit (resources.limits.memory, %v): the pod would be killed before the store evicts" .Values.config.maxMemory $limit) }}
{{- end }}
{{- end }}
{{- include "kv-responder.envText" .Values.config.maxMemory }}
{{- else if $limit }}
{{- $bytes := include "kv-responder.quantityBytes" $limit | int64 }}
{{- div (mul $bytes (int64 .Values.config.maxMemoryPercent)) 100 }}
{{- end }}
{{- end }}

{{/*
The pod's memory, as the node will use it (JSON, bytes): the limit, config.memoryBaseline (what the interpreter
holds before any key), the store budget (MAX_MEMORY, or its default share of the limit) and the request bodies'
buffer (MAX_BODY_BUFFER, or the node's default). Empty without a memory limit or with a baseline of 0.
*/}}
{{- define "kv-responder.memoryPlan" -}}
{{- $limit := dig "limits" "memory" "" (.Values.resources | default dict) }}
{{- $baseline := include "kv-responder.quantityBytes" (.Values.config.memoryBaseline | default 0) | int64 }}
{{- if and $limit (gt $baseline 0) }}
{{- $limitBytes := include "kv-responder.quantityBytes" $limit | int64 }}
{{- $store := div (mul $limitBytes (int64 .Values.config.maxMemoryPercent)) 100 }}
{{- if .Values.config.maxMemory }}
{{- $store = include "kv-responder.quantityBytes" .Values.config.maxMemory | int64 }}
{{- end }}
{{- $bodies := max 67108864 (mul 16 (include "kv-responder.quantityBytes" .Values.config.maxValueSize | int64)) }}
{{- if .Values.config.maxBodyBuffer }}
{{- $bodies = include "kv-responder.quantityBytes" .Values.config.maxBodyBuffer | int64 }}
{{- end }}
{{- dict "limit" $limitBytes "baseline" $baseline "store" $store "bodies" $bodies | toJson }}
{{- end }}
{{- end }}

{{/*
Fails the render when the memory limit cannot hold the interpreter's baseline, the store budget and the request
bodies' buffer together: the pod would be killed for memory, again and again, before its store ever filled.
*/}}
{{- define "kv-responder.memoryFits" -}}
{{- with include "kv-responder.memoryPlan" . }}
{{- $plan := fromJson . }}
{{- $needed := add (int64 $plan.baseline) (int64 $plan.store) (int64 $plan.bodies) }}
{{- if ge $needed (int64 $plan.limit) }}
{{- fail (printf "resources.limits.memory (%v) cannot hold the interpreter's baseline (config.memoryBaseline, %v), the store budget (%d bytes) and the request bodies' buffer (%d bytes): the pod would be killed for memory before its store filled. Raise the limit, or lower config.maxMemoryPercent (or config.maxMemory) or config.maxBodyBuffer; on a CPython image set config.memoryBaseline=60Mi" $.Values.resources.limits.memory $.Values.config.memoryBaseline (int64 $plan.store) (int64 $plan.bodies)) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
MAX_BODY_BUFFER: config.maxBodyBuffer, or else nothing (the node's default: the larger of 64 MiB and two /bulk
bodies). The node refuses to start below 1Mi or below one /bulk body (8 x config.maxValueSize): so does the chart.
*/}}
{{- define "kv-responder.maxBodyBuffer" -}}
{{- if .Values.config.maxBodyBuffer }}
{{- $bytes := include "kv-responder.quantityBytes" .Values.config.maxBodyBuffer | int64 }}
{{- $bulk := mul 8 (include "kv-responder.quantityBytes" .Values.config.maxValueSize | int64) }}
{{- if or (lt $bytes 1048576) (lt $bytes $bulk) }}
{{- fail (printf "config.maxBodyBuffer (%v) must hold 1Mi and one /bulk body, 8 x config.maxValueSize = %d bytes: the node would refuse to start" .Values.config.maxBodyBuffer $bulk) }}
{{- end }}
{{- include "kv-responder.envText" .Values.config.maxBodyBuffer }}
{{- end }}
{{- end }}

{{/*
The longest a stopping node waits, after its drain, for the requests it already took: 2 x PEER_REQUEST_TIMEOUT
(kvresponder/tap.py), in whole seconds rounded up. The timeout is the PEER_REQUEST_TIMEOUT that extraEnv sets by
value (at most one entry: the deployment refuses a name twice), read as the node reads it (surrounding spaces
ignored; empty or null for unset); else, and where it comes from valueFrom (unknown here), the node's default of 2 s. A value the node would refuse fails the render.
*/}}
{{- define "kv-responder.exitWait" -}}
{{- $text := "" }}
{{- range .Values.extraEnv }}
{{- if eq (toString .name) "PEER_REQUEST_TIMEOUT" }}
{{- $text = ternary (toString .value) "" (and (hasKey . "value") (not (kindIs "invalid" .value))) }}
{{- end }}
{{- end }}
{{- $timeout := 2.0 }}
{{- if $text }}
{{- if not (regexMatch "^[+]?([0-9]+[.]?[0-9]*|[.][0-9]+)([eE][+-]?[0-9]+)?$" (trim $text)) }}
{{- fail (printf "extraEnv PEER_REQUEST_TIMEOUT (%q) is not a number of seconds: the node would refuse it" $text) }}
{{- end }}
{{- $timeout = float64 (trim $text) }}
{{- if not (and (gt $timeout 0.0) (lt $timeout 1e9)) }}
{{- fail (printf "extraEnv PEER_REQUEST_TIMEOUT (%q) must be a positive number of seconds below 1e9: the node would refuse it" $text) }}
{{- end }}
{{- end }}
{{- ceil (mulf $timeout 2) | int64 }}
{{- end }}

{{/*
DRAIN_TIMEOUT: drainTimeout, or else max(grace / 2, grace - 10), shortened where needed to leave room for what
follows. A drain runs up to DRAIN_TIMEOUT + 1 s (its guard, kvresponder/node.py), then the node waits for the
requests it took (exitWait), then gives its trace exporter and its last log lines up to 1 s (0.5 s each,
kvresponder/tracing.py and kvresponder/tap.py), then needs a moment to exit: all of it must end before the grace
period does, or Kubernetes kills the node mid-handoff, with requests it took unanswered, or its last lines unwritten.
*/}}
{{- define "kv-responder.drainTimeout" -}}
{{- $grace := int64 .Values.terminationGracePeriodSeconds }}
{{- $wait := include "kv-responder.exitWait" . | int64 }}
{{- $flush := 1 }}
{{- $drain := int64 .Values.drainTimeout }}
{{- if eq $drain 0 }}
{{- $drain = min (max (div $grace 2) (sub $grace 10)) (sub $grace (add 1 $wait $flush 1)) }}
{{- if lt $drain 1 }}
{{- fail (printf "terminationGracePeriodSeconds (%d) leaves no time to drain: a stopping node needs its drain and its 1 s guard, then up to %d s (2 x PEER_REQUEST_TIMEOUT) to answer the requests it took, then up to %d s for its traces and last log lines, then a moment to exit; give it at least %d" $grace $wait $flush (add $wait $flush 3)) }}
{{- end }}
{{- end }}
{{- if ge (add $drain 1 $wait $flush) $grace }}
{{- fail (printf "drainTimeout (%d), its 1 s guard, the exit's wait of up to %d s (2 x PEER_REQUEST_TIMEOUT) and up to %d s for traces and the last log lines must together be less than terminationGracePeriodSeconds (%d), or Kubernetes kills the node before its data is handed off, the requests it took are answered and its last lines are written" $drain $wait $flush $grace) }}
{{- end }}
{{- $drain }}
{{- end }}

{{- define "kv-responder.clusterSecretName" -}}
{{- default (include "kv-responder.fullname" .) .Values.clusterSecret.existingSecret }}
{{- end }}

{{- define "kv-responder.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/*
HPA behavior presets.
api: react to load spikes within 30 s, give capacity back slowly (600 s).
cache: one pod at a time both ways, since every membership change moves keys.
*/}}
{{- define "kv-responder.hpaBehavior" -}}
{{- $preset := .Values.autoscaling.preset }}
{{- if eq $preset "api" }}
scaleUp:
  stabilizationWindowSeconds: 30
  selectPolicy: Max
  policies:
    - type: Percent
      value: 100
      periodSeconds: 30
    - type: Pods
      value: 4
      periodSeconds: 30
scaleDown:
  stabilizationWindowSeconds: 600
  selectPolicy: Min
  policies:
    - type: Pods
      value: 1
      periodSeconds: 60
{{- else if eq $preset "cache" }}
scaleUp:
  stabilizationWindowSeconds: 120
  selectPolicy: Min
  policies:
    - type: Pods
      value: 1
      periodSeconds: 120
scaleDown:
  stabilizationWindowSeconds: 900
  selectPolicy: Min
  policies:
    - type: Pods
      value: 1
      periodSeconds: 300
{{- else if eq $preset "custom" }}
{{- if not .Values.autoscaling.behavior }}
{{- fail "autoscaling.preset is custom but autoscaling.behavior is empty: set the HPA behavior to use verbatim" }}
{{- end }}
{{- toYaml .Values.autoscaling.behavior }}
{{- else }}
{{- fail (printf "autoscaling.preset %q is unknown: use api, cache or custom" $preset) }}
{{- end }}
{{- end }}

{{/*
A NetworkPolicy namespaceSelector: the given selector, or else the namespace
named by `namespace`.
*/}}
{{- define "kv-responder.namespaceSelector" -}}
{{- if .namespaceSelector }}
{{- toYaml .namespaceSelector }}
{{- else if .namespace }}
matchLabels:
  kubernetes.io/metadata.name: {{ .namespace }}
{{- else }}
{{- fail "networkPolicy: set a namespace or a namespaceSelector for the ingress controller and for monitoring" }}
{{- end }}
{{- end }}
