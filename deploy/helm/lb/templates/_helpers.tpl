{{/* The namespace of every namespaced object: the chart's own, or the release's. */}}
{{- define "lb.namespace" -}}
{{- if .Values.namespace.create }}{{ .Values.namespace.name }}{{ else }}{{ .Release.Namespace }}{{ end -}}
{{- end }}

{{- define "lb.labels" -}}
app.kubernetes.io/name: lb
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end }}

{{- define "lb.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{/*
The node config the agents read. metrics_listen comes from metrics.port, so that the agent,
its probes, the Service and the ServiceMonitor cannot disagree.
*/}}
{{- define "lb.nodeConfig" -}}
{{- $node := merge (dict "metrics_listen" (printf "0.0.0.0:%d" (int .Values.metrics.port))) .Values.node -}}
{{ dict "node" $node | toYaml }}
{{- end }}

{{/*
table_size must be prime (Maglev needs it): JSON schema cannot say so, this does, by trial
division up to the square root (the schema bounds table_size by 2^24, so d stays below 4097).
*/}}
{{- define "lb.checkPrime" -}}
{{- $n := int .Values.node.table_size -}}
{{- $prime := ge $n 2 -}}
{{- range $d := untilStep 2 4097 1 -}}
{{- if gt (mul $d $d) $n -}}{{- break -}}{{- end -}}
{{- if eq (mod $n $d) 0 -}}{{- $prime = false -}}{{- break -}}{{- end -}}
{{- end -}}
{{- if not $prime -}}
{{- fail (printf "node.table_size: %d is not prime (Maglev needs a prime table size, e.g. 65537, 131071)" $n) -}}
{{- end -}}
{{- end }}

{{/*
The container's memory (MiB): the BPF maps the node's sizes make, which the kernel charges to
the container's memory cgroup, plus resources.agentMiB for the agent's heap and the program.
Bytes per entry measured with the real program under a memory cgroup (README "Memory"):
flow_table_size 52 (the IPv4 buckets and the IPv6 LRU of a quarter), nat_table_size 296 (both
NAT tables), affinity_table_size 104, each ring slot (max_vips x table_size) 8, max_backends 66,
and 24 per CPU for each VIP's and backend's counters (per-CPU maps, resources.cpusPerNode).
resources.memoryMiB, when set, is used instead, and refused below what the maps need.
*/}}
{{- define "lb.mapMiB" -}}
{{- $n := .Values.node -}}
{{- $bytes := add
  (mul 52 (int64 $n.flow_table_size))
  (mul 296 (int64 $n.nat_table_size))
  (mul 104 (int64 $n.affinity_table_size))
  (mul 8 (int64 $n.max_vips) (int64 $n.table_size))
  (mul 66 (int64 $n.max_backends))
  (mul 24 (add (int64 $n.max_vips) (int64 $n.max_backends)) (int64 .Values.resources.cpusPerNode)) -}}
{{- div (add $bytes 1048575) 1048576 -}}
{{- end }}

{{- define "lb.memoryMiB" -}}
{{- $need := add (include "lb.mapMiB" . | int64) (int64 .Values.resources.agentMiB) -}}
{{- $set := .Values.resources.memoryMiB -}}
{{- if eq (toString $set) "" -}}
{{- $need -}}
{{- else if lt (int64 $set) $need -}}
{{- fail (printf "resources.memoryMiB: %v MiB cannot hold this node's maps and the agent: the sizes in node need %d MiB (%s MiB of maps + resources.agentMiB); raise it, leave it empty, or lower the sizes" $set $need (include "lb.mapMiB" .)) -}}
{{- else -}}
{{- int64 $set -}}
{{- end -}}
{{- end }}
