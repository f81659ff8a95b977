{{/* Names ---------------------------------------------------------------------------------- */}}

{{- define "rstitch.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The prefix of every object's name (kept short: StatefulSet pods append "-N" and headless
Services "-headless"). */}}
{{- define "rstitch.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "rstitch.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels: (dict "root" $ "component" "orchestrator") */}}
{{- define "rstitch.selectorLabels" -}}
app.kubernetes.io/name: {{ include "rstitch.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "rstitch.labels" -}}
helm.sh/chart: {{ include "rstitch.chart" .root }}
{{ include "rstitch.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/part-of: rstitch
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
{{- end -}}

{{- define "rstitch.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "rstitch.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The engine workloads: colocated => one StatefulSet "engines" with both roles (the LLM first:
it owns the GPU); split => one StatefulSet per role. A list of dicts {name, roles}. */}}
{{- define "rstitch.engineUnits" -}}
{{- if eq .Values.placement "colocated" -}}
- name: engines
  roles: [llm, slm]
{{- else -}}
- name: slm
  roles: [slm]
- name: llm
  roles: [llm]
{{- end -}}
{{- end -}}

{{/* The StatefulSet (and headless Service) that serves a role. */}}
{{- define "rstitch.engineUnitName" -}}
{{- if eq .root.Values.placement "colocated" -}}engines{{- else -}}{{ .role }}{{- end -}}
{{- end -}}

{{/* host:port of a role's engines: the headless Service's DNS name resolves to every ready
replica. (dict "root" $ "role" "slm") */}}
{{- define "rstitch.engineAddress" -}}
{{- $root := .root -}}
{{- $unit := include "rstitch.engineUnitName" . -}}
{{- $port := index $root.Values.engines .role "port" | int -}}
{{- printf "%s-%s-headless.%s.svc.%s:%d" (include "rstitch.fullname" $root) $unit $root.Release.Namespace $root.Values.clusterDomain $port -}}
{{- end -}}

{{/* Images ---------------------------------------------------------------------------------- */}}

{{/* (dict "root" $ "image" .Values.orchestrator.image "cuda" false) */}}
{{- define "rstitch.image" -}}
{{- $root := .root -}}
{{- $repo := .image.repository | default $root.Values.image.repository -}}
{{- $tag := .image.tag -}}
{{- if not $tag -}}
{{- $base := $root.Values.image.tag | default $root.Chart.AppVersion -}}
{{- if .cuda -}}
{{- $tag = $root.Values.image.cudaTag | default (printf "%s-cuda" $base) -}}
{{- else -}}
{{- $tag = $base -}}
{{- end -}}
{{- end -}}
{{- include "rstitch.registryImage" (dict "root" $root "ref" (printf "%s:%s" $repo $tag)) -}}
{{- end -}}

{{- define "rstitch.registryImage" -}}
{{- with .root.Values.global.imageRegistry -}}
{{- printf "%s/%s" (trimSuffix "/" .) $.ref -}}
{{- else -}}
{{- .ref -}}
{{- end -}}
{{- end -}}

{{- define "rstitch.pullPolicy" -}}
{{- .image.pullPolicy | default .root.Values.image.pullPolicy -}}
{{- end -}}

{{- define "rstitch.imagePullSecrets" -}}
{{- with .Values.global.imagePullSecrets }}
imagePullSecrets:
{{ toYaml . }}
{{- end -}}
{{- end -}}

{{/* Environment --------------------------------------------------------------------------- */}}

{{/* Environment of every R-Stitch container: pod identity, writable caches and OpenTelemetry.
(dict "root" $ "service" "orchestrator") */}}
{{- define "rstitch.env" -}}
{{- $root := .root -}}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: XDG_CACHE_HOME
  value: /cache
- name: HF_HOME
  value: /cache/huggingface
- name: RSTITCH_HOME
  value: /cache/rstitch
- name: TRITON_CACHE_DIR
  value: /cache/triton
- name: CUDA_CACHE_PATH
  value: /cache/nv
- name: OTEL_SERVICE_NAME
  value: rstitch-{{ .service }}
{{- if $root.Values.otel.enabled }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ include "rstitch.otelEndpoint" $root | quote }}
- name: OTEL_EXPORTER_OTLP_PROTOCOL
  value: {{ $root.Values.otel.protocol | quote }}
- name: OTEL_TRACES_EXPORTER
  value: otlp
- name: OTEL_TRACES_SAMPLER
  value: {{ $root.Values.otel.sampler | quote }}
- name: OTEL_TRACES_SAMPLER_ARG
  value: {{ $root.Values.otel.samplerArg | toString | quote }}
- name: OTEL_RESOURCE_ATTRIBUTES
  value: {{ printf "service.namespace=%s,service.instance.id=$(POD_NAME),k8s.pod.name=$(POD_NAME),k8s.namespace.name=$(POD_NAMESPACE)" $root.Release.Namespace }}{{ with $root.Values.otel.resourceAttributes }},{{ . }}{{ end }}
{{- else }}
- name: OTEL_SDK_DISABLED
  value: "true"
{{- end }}
{{- end -}}

{{- define "rstitch.otelEndpoint" -}}
{{- if .Values.otel.endpoint -}}
{{- .Values.otel.endpoint -}}
{{- else if .Values.jaeger.enabled -}}
{{- $port := ternary 4317 4318 (eq .Values.otel.protocol "grpc") -}}
{{- printf "http://%s-jaeger.%s.svc.%s:%d" (include "rstitch.fullname" .) .Release.Namespace .Values.clusterDomain $port -}}
{{- else -}}
{{- fail "otel.enabled needs otel.endpoint, or jaeger.enabled for the bundled Jaeger" -}}
{{- end -}}
{{- end -}}

{{/* Probes ---------------------------------------------------------------------------------- */}}

{{/* The kubelet's native gRPC probe calls grpc.health.v1.Health/Check, which every service
serves (plaintext only: with tls.enabled the probes fall back to a TCP connect). With "httpPort"
(the orchestrator's HTTP API) readiness is GET /health there instead, over HTTPS with TLS (the kubelet
does not check the certificate), and a TCP connect where clients must present a certificate.
(dict "root" $ "port" 50050 "startupSeconds" 900 ["httpPort" 8000]) */}}
{{- define "rstitch.probeHandler" -}}
{{- if .root.Values.tls.enabled -}}
tcpSocket:
  port: {{ .port | int }}
{{- else -}}
grpc:
  port: {{ .port | int }}
{{- end -}}
{{- end -}}

{{- define "rstitch.httpProbeHandler" -}}
{{- $tls := .root.Values.tls -}}
{{- if and $tls.enabled $tls.clientAuth -}}
tcpSocket:
  port: {{ .httpPort | int }}
{{- else -}}
httpGet:
  path: /health
  port: {{ .httpPort | int }}
  scheme: {{ ternary "HTTPS" "HTTP" $tls.enabled }}
{{- end -}}
{{- end -}}

{{- define "rstitch.probes" -}}
startupProbe:
  {{- include "rstitch.probeHandler" . | nindent 2 }}
  periodSeconds: 10
  timeoutSeconds: 5
  failureThreshold: {{ max 1 (div (.startupSeconds | int) 10) }}
readinessProbe:
  {{- if .httpPort }}
  {{- include "rstitch.httpProbeHandler" . | nindent 2 }}
  {{- else }}
  {{- include "rstitch.probeHandler" . | nindent 2 }}
  {{- end }}
  periodSeconds: 5
  timeoutSeconds: 3
  failureThreshold: 3
livenessProbe:
  {{- include "rstitch.probeHandler" . | nindent 2 }}
  periodSeconds: 10
  timeoutSeconds: 5
  failureThreshold: 6
{{- end -}}

{{/* Volumes --------------------------------------------------------------------------------- */}}

{{- define "rstitch.tlsDir" -}}/etc/rstitch/tls{{- end -}}

{{- define "rstitch.commonVolumes" -}}
- name: tmp
  emptyDir: {}
- name: cache
  emptyDir: {}
{{- if .Values.tls.enabled }}
- name: tls
  secret:
    secretName: {{ required "tls.enabled needs tls.secretName (a kubernetes.io/tls Secret with ca.crt)" .Values.tls.secretName }}
    defaultMode: 0440
{{- end }}
{{- end -}}

{{- define "rstitch.commonVolumeMounts" -}}
- name: tmp
  mountPath: /tmp
- name: cache
  mountPath: /cache
{{- if .Values.tls.enabled }}
- name: tls
  mountPath: {{ include "rstitch.tlsDir" . }}
  readOnly: true
{{- end }}
{{- end -}}

{{/* Server-side TLS flags shared by every service. */}}
{{- define "rstitch.serverTlsArgs" -}}
{{- if .Values.tls.enabled }}
- --tls-cert
- {{ include "rstitch.tlsDir" . }}/tls.crt
- --tls-key
- {{ include "rstitch.tlsDir" . }}/tls.key
{{- end }}
{{- end -}}

{{/* Redis ------------------------------------------------------------------------------------ */}}

{{- define "rstitch.redisSecretName" -}}
{{- .Values.redis.auth.existingSecret | default (printf "%s-redis" (include "rstitch.fullname" .)) -}}
{{- end -}}

{{/* Whether the orchestrator gets REDIS_PASSWORD. */}}
{{- define "rstitch.redisPassword" -}}
{{- if .Values.redis.auth.enabled -}}
{{- if and (not .Values.redis.bundled) (not .Values.redis.auth.existingSecret) -}}
{{- fail "redis.auth.enabled with an external Redis needs redis.auth.existingSecret" -}}
{{- end -}}
true
{{- end -}}
{{- end -}}

{{/* The URL given to --redis; $(REDIS_PASSWORD) is expanded by the kubelet from the env. */}}
{{- define "rstitch.redisUrl" -}}
{{- $auth := include "rstitch.redisPassword" . -}}
{{- if .Values.redis.bundled -}}
{{- printf "redis://%s%s-redis.%s.svc.%s:6379/0" (ternary ":$(REDIS_PASSWORD)@" "" (eq $auth "true")) (include "rstitch.fullname" .) .Release.Namespace .Values.clusterDomain -}}
{{- else -}}
{{- $url := required "redis.bundled: false needs redis.url (redis://host:6379/0)" .Values.redis.url -}}
{{- if eq $auth "true" -}}
{{- $parts := splitn "://" 2 $url -}}
{{- printf "%s://:$(REDIS_PASSWORD)@%s" $parts._0 $parts._1 -}}
{{- else -}}
{{- $url -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Scheduling ------------------------------------------------------------------------------ */}}

{{/* nodeSelector/tolerations/affinity blocks from a dict {nodeSelector, tolerations, affinity}. */}}
{{- define "rstitch.scheduling" -}}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Engines --------------------------------------------------------------------------------- */}}

{{/* Colocated pods with the device plugin: the LLM container owns the GPU and hands its UUID to
the SLM container through the pod's "gpu-handoff" volume. */}}
{{- define "rstitch.gpuHandoff" -}}
{{- $v := .Values -}}
{{- and (eq $v.placement "colocated") $v.gpu.enabled (eq $v.gpu.sharing "devicePlugin") | ternary "true" "" -}}
{{- end -}}

{{/* The --dtype of a role: its own, else bfloat16 on a GPU and float32 on the CPU. (dict "root" $ "role" "llm") */}}
{{- define "rstitch.engineDtype" -}}
{{- (index .root.Values.engines .role).dtype | default (ternary "bfloat16" "float32" .root.Values.gpu.enabled) -}}
{{- end -}}

{{/* GPUs one pod of a role holds: its tensorParallelSize (colocated pods share one). */}}
{{- define "rstitch.engineGpus" -}}
{{- (index .root.Values.engines .role).tensorParallelSize | default 1 | int -}}
{{- end -}}

{{/* The DRA ResourceClaimTemplate for pods of `count` GPUs: (dict "root" $ "count" 2) */}}
{{- define "rstitch.gpuClaimTemplateName" -}}
{{- $name := printf "%s-gpu" (include "rstitch.fullname" .root) -}}
{{- if gt (.count | int) 1 -}}{{ printf "%s-x%d" $name (.count | int) }}{{- else -}}{{ $name }}{{- end -}}
{{- end -}}

{{/* Engine settings that cannot work together fail the render. */}}
{{- define "rstitch.engineChecks" -}}
{{- $v := .Values -}}
{{- range $role := list "slm" "llm" -}}
{{- $e := index $v.engines $role -}}
{{- $tp := $e.tensorParallelSize | default 1 | int -}}
{{- if gt $tp 1 -}}
{{- $what := printf "engines.%s.tensorParallelSize is %d" $role $tp -}}
{{- if not $v.gpu.enabled -}}
{{- fail (printf "%s, but gpu.enabled is false: tensor parallelism spreads a model over GPUs" $what) -}}
{{- else if eq $v.placement "colocated" -}}
{{- fail (printf "%s, but colocated engines share one GPU: use placement: split" $what) -}}
{{- else if ne $e.backend "vllm" -}}
{{- fail (printf "%s, but the %s backend runs a model on one GPU: set engines.%s.backend: vllm" $what $e.backend $role) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* One engine container. (dict "root" $ "role" "llm") */}}
{{- define "rstitch.engineContainer" -}}
{{- $root := .root -}}
{{- $v := $root.Values -}}
{{- $e := index $v.engines .role -}}
{{- $colocated := eq $v.placement "colocated" -}}
{{- $handoff := include "rstitch.gpuHandoff" $root -}}
{{- $gpus := include "rstitch.engineGpus" . | int -}}
{{- $resources := deepCopy ($e.resources | default dict) -}}
{{- if $v.gpu.enabled -}}
{{- if eq $v.gpu.sharing "dra" -}}
{{- $_ := set $resources "claims" (list (dict "name" "gpu")) -}}
{{- else if or (not $colocated) (eq .role "llm") -}}
{{- /* A device plugin's resource is requested by its limit (Kubernetes sets the request to it). */ -}}
{{- $limits := $resources.limits | default dict -}}
{{- $_ := set $limits $v.gpu.resourceName (toString $gpus) -}}
{{- $_ := set $resources "limits" $limits -}}
{{- end -}}
{{- end -}}
- name: {{ .role }}
  image: {{ include "rstitch.image" (dict "root" $root "image" $e.image "cuda" $v.gpu.enabled) }}
  imagePullPolicy: {{ include "rstitch.pullPolicy" (dict "root" $root "image" $e.image) }}
  {{- if $handoff }}
  command:
    - sh
    - -c
    {{- if eq .role "llm" }}
    - |
      # This container holds the pod's GPU: tell the SLM container which one it is.
      ids=$(nvidia-smi --query-gpu=uuid --format=csv,noheader 2>/dev/null | paste -sd, -)
      [ -n "$ids" ] || ids="$NVIDIA_VISIBLE_DEVICES"
      echo "$ids" > /run/rstitch-gpu/devices.tmp && mv /run/rstitch-gpu/devices.tmp /run/rstitch-gpu/devices
      exec python -m llm_service "$@"
    {{- else }}
    - |
      # Use the GPU the LLM container was given (this container requests none).
      i=0
      while [ ! -s /run/rstitch-gpu/devices ]; do
        i=$((i + 1)); [ "$i" -le 600 ] || { echo "the llm container handed over no GPU" >&2; exit 1; }
        sleep 1
      done
      export CUDA_VISIBLE_DEVICES="$(cat /run/rstitch-gpu/devices)"
      exec python -m slm_service "$@"
    {{- end }}
    - {{ .role }}_service
  {{- end }}
  args:
    {{- if not $handoff }}
    - {{ .role }}_service
    {{- end }}
    - --host
    - 0.0.0.0
    - --port
    - {{ $e.port | int | quote }}
    - --device
    - {{ ternary "cuda" "cpu" $v.gpu.enabled }}
    {{- with $e.model }}
    - --model
    - {{ . | quote }}
    {{- end }}
    {{- with $e.modelId }}
    - --model-id
    - {{ . | quote }}
    {{- end }}
    - --backend
    - {{ $e.backend | default "hf" }}
    - --dtype
    - {{ include "rstitch.engineDtype" . }}
    {{- if gt $gpus 1 }}
    - --tensor-parallel-size
    - {{ $gpus | quote }}
    {{- end }}
    - --kv-budget-mb
    - {{ $e.kvBudgetMb | toString | quote }}
    - --max-sessions
    - {{ $e.maxSessions | int64 | quote }}
    - --max-calls
    - {{ $e.maxCalls | int64 | quote }}
    {{- if gt ($e.maxContext | int64) 0 }}
    - --max-context
    - {{ $e.maxContext | int64 | quote }}
    {{- end }}
    {{- if gt ($e.threads | int64) 0 }}
    - --threads
    - {{ $e.threads | int64 | quote }}
    {{- end }}
    {{- include "rstitch.nindentIf" (dict "text" (include "rstitch.serverTlsArgs" $root) "n" 4) }}
    {{- if and $v.tls.enabled $v.tls.mutual }}
    - --tls-client-ca
    - {{ include "rstitch.tlsDir" $root }}/ca.crt
    {{- end }}
    {{- if $v.metrics.enabled }}
    - --metrics-port
    - {{ index $v.metrics (printf "%sPort" .role) | int | quote }}
    {{- end }}
    {{- with $e.extraArgs }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  ports:
    - name: grpc-{{ .role }}
      containerPort: {{ $e.port | int }}
      protocol: TCP
    {{- if $v.metrics.enabled }}
    - name: metrics-{{ .role }}
      containerPort: {{ index $v.metrics (printf "%sPort" .role) | int }}
      protocol: TCP
    {{- end }}
  env:
    {{- include "rstitch.env" (dict "root" $root "service" .role) | nindent 4 }}
    {{- if and $v.gpu.enabled $colocated }}
    - name: RSTITCH_GPU_MEMORY_FRACTION
      value: {{ $e.gpuMemoryFraction | toString | quote }}
    {{- end }}
    {{- if and $handoff (eq .role "slm") }}
    - name: NVIDIA_VISIBLE_DEVICES
      value: all
    - name: NVIDIA_DRIVER_CAPABILITIES
      value: compute,utility
    - name: CUDA_DEVICE_ORDER
      value: PCI_BUS_ID
    {{- end }}
    {{- with $e.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  volumeMounts:
    {{- include "rstitch.commonVolumeMounts" $root | nindent 4 }}
    {{- if or $v.models.existingClaim $v.models.hostPath }}
    - name: models
      mountPath: {{ $v.models.mountPath }}
      readOnly: true
    {{- end }}
    {{- if $handoff }}
    - name: gpu-handoff
      mountPath: /run/rstitch-gpu
    {{- end }}
  {{- with $resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml $v.securityContext | nindent 4 }}
  {{- include "rstitch.probes" (dict "root" $root "port" $e.port "startupSeconds" $v.engines.startupSeconds) | nindent 2 }}
{{- end -}}

{{/* Indent a snippet that may be empty without leaving a blank line: (dict "text" ... "n" 6) */}}
{{- define "rstitch.nindentIf" -}}
{{- $s := trim .text -}}
{{- if $s -}}
{{- $s | nindent .n -}}
{{- end -}}
{{- end -}}
