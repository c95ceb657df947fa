{{/* The namespace of every namespaced object: the chart's own, or the release's. */}}
{{- define "lb.namespace" -}}
{{- if .Values.namespace.create }}{{ .Values.namespace.name }}{{ else }}{{ .Release.Namespace }}{{ end -}}
{{- end }}

{{/* The chart's name (nameOverride replaces it), for the app.kubernetes.io/name label. */}}
{{- define "lb.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The release's objects are named after it, so that two releases (two node pools, or two load
balancers with their own class) do not claim the same names: the release name, or
<release>-<name> when the release name does not contain the chart's name (release "lb" keeps
the names "lb", "lb-node", ... that 0.3.0 used). fullnameOverride replaces it. At most 63
characters (a DNS label); "lb.child" keeps a suffixed name within 63 as well.
*/}}
{{- define "lb.fullname" -}}
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

{{/* `include "lb.child" (list . "metrics")`: <fullname>-metrics, within 63 characters. */}}
{{- define "lb.child" -}}
{{- $ctx := index . 0 }}{{ $suffix := index . 1 -}}
{{- $base := include "lb.fullname" $ctx | trunc (int (sub 62 (len $suffix))) | trimSuffix "-" -}}
{{- printf "%s-%s" $base $suffix -}}
{{- end }}

{{/*
What selects this release's agents (the DaemonSet, the metrics Service): the instance label
keeps two releases' DaemonSets from selecting each other's pods.
*/}}
{{- define "lb.selectorLabels" -}}
app.kubernetes.io/name: {{ include "lb.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "lb.labels" -}}
{{ include "lb.selectorLabels" . }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end }}

{{/*
No lb image is published, so there is no default that would pull: the chart refuses to render
without image.repository rather than leave every node in ImagePullBackOff.
*/}}
{{- define "lb.image" -}}
{{- $repo := required "image.repository: no lb image is published; build the Dockerfile (docker build -t <registry>/lb:<tag> .), push it where the nodes pull from, and set image.repository (image.tag defaults to the chart's appVersion)" .Values.image.repository -}}
{{ $repo }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{/*
The Lease whose holder writes status. One per class: releases serving the same class (one load
balancer on several node pools) must share it, or two writers with different views would
overwrite each other; releases serving different classes must not, or one would never write.
The class "default" keeps the name 0.3.0 used.
*/}}
{{- define "lb.leaseName" -}}
{{- if eq .Values.class "default" }}lb-status-writer{{ else }}lb-status-writer-{{ .Values.class | lower | replace "_" "-" }}{{ end -}}
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
the container's memory cgroup, plus the agent's tables (lb.agentTablesMiB), plus
resources.agentMiB for the rest of the agent's heap and the program's verification.
Bytes per entry measured with the real program under a memory cgroup (docs/kubernetes.md, "Memory"):
flow_table_size 52 (the IPv4 buckets and the IPv6 LRU of a quarter), nat_table_size 296 (both
NAT tables), affinity_table_size 104, each ring slot (max_vips x table_size) 8, max_backends 66,
and 24 per CPU for each VIP's and backend's counters (per-CPU maps, resources.cpusPerNode).
resources.memoryMiB, when set, is used instead, and refused below what the sizes need.
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

{{/*
The agent's own memory that grows with the sizes (MiB): 6 bytes per ring slot (max_vips x
table_size). The agent keeps each VIP's table compact (1 byte a slot up to 256 members, 2 up to
65,536), and a resync that changes every VIP holds the old and the new tables and slot writes of
at most a quarter of each table (8 bytes a slot written); above that share a table is written
whole from the new one. Measured (tests/tests/helm.rs, docs/kubernetes.md "Memory"): the agent at
256 x 65537 synced and resynced peaks at 347 MiB over everything, which is its start's (the
program's verification), not its tables'.
*/}}
{{- define "lb.agentTablesMiB" -}}
{{- $n := .Values.node -}}
{{- div (add (mul 6 (int64 $n.max_vips) (int64 $n.table_size)) 1048575) 1048576 -}}
{{- end }}

{{- define "lb.memoryMiB" -}}
{{- $need := add (include "lb.mapMiB" . | int64) (include "lb.agentTablesMiB" . | int64) (int64 .Values.resources.agentMiB) -}}
{{- $set := .Values.resources.memoryMiB -}}
{{- if eq (toString $set) "" -}}
{{- $need -}}
{{- else if lt (int64 $set) $need -}}
{{- fail (printf "resources.memoryMiB: %v MiB cannot hold this node's maps and the agent: the sizes in node need %d MiB (%s MiB of maps + %s MiB of the agent's tables + resources.agentMiB); raise it, leave it empty, or lower the sizes" $set $need (include "lb.mapMiB" .) (include "lb.agentTablesMiB" .)) -}}
{{- else -}}
{{- int64 $set -}}
{{- end -}}
{{- end }}
