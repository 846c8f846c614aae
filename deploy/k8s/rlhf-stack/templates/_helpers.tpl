{{/*
The services and the facts about them that values do not change: their ports, the prefix
of their settings, and the workload kind. Ports are the services' defaults (README.md,
"Configuration"). The policy and feedback run as StatefulSets: a pod's ordinal decides the
policy's rollout worker and the feedback join's partitions, and each feedback replica keeps
its join state on its own volume.
*/}}
{{- define "rlhf.components" -}}
policy: {port: 50051, metricsPort: 9101, httpPort: 0, prefix: RLHF_POLICY, kind: StatefulSet, dns: policy, module: rlhf_policy}
reward: {port: 50052, metricsPort: 9102, httpPort: 8002, prefix: RLHF_REWARD, kind: Deployment, dns: reward, module: rlhf_reward}
reference: {port: 50053, metricsPort: 9103, httpPort: 0, prefix: RLHF_REFERENCE, kind: Deployment, dns: reference, module: rlhf_reference}
trainer: {port: 50054, metricsPort: 9104, httpPort: 0, prefix: RLHF_TRAINER, kind: Deployment, dns: trainer, module: rlhf_trainer}
feedback: {port: 50055, metricsPort: 9105, httpPort: 8005, prefix: RLHF_FEEDBACK, kind: StatefulSet, dns: feedback, module: rlhf_feedback}
reward_learner: {port: 50056, metricsPort: 9106, httpPort: 0, prefix: RLHF_REWARD_LEARNER, kind: Deployment, dns: reward-learner, module: rlhf_reward_learner}
{{- end -}}

{{- define "rlhf.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Name of a component's objects; call with (dict "root" $ "c" $facts). */}}
{{- define "rlhf.name" -}}
{{- printf "%s-%s" (include "rlhf.fullname" .root) .c.dns -}}
{{- end -}}

{{- define "rlhf.labels" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version }}
{{- with .c }}
app.kubernetes.io/component: {{ .dns }}
{{- end }}
{{- end -}}

{{- define "rlhf.selector" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .c.dns }}
{{- end -}}

{{- define "rlhf.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "rlhf.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "rlhf.secretName" -}}
{{- default (printf "%s-api-keys" (include "rlhf.fullname" .)) .Values.secrets.existingSecret -}}
{{- end -}}

{{- define "rlhf.strimziCluster" -}}
{{- default (printf "%s-kafka" (include "rlhf.fullname" .)) .Values.kafka.strimzi.clusterName -}}
{{- end -}}

{{- define "rlhf.strimziUser" -}}
{{- printf "%s-client" (include "rlhf.fullname" .) -}}
{{- end -}}

{{- define "rlhf.weightsClaim" -}}
{{- default (printf "%s-weights" (include "rlhf.fullname" .)) .Values.weightStore.pvc.existingClaim -}}
{{- end -}}

{{/*
The Kafka client settings every service gets, as YAML: the bootstrap address, the security
protocol and SASL mechanism, where the password and certificates come from, and the broker
ports and peers for the NetworkPolicies. With Strimzi they follow from the listener.
*/}}
{{- define "rlhf.kafka" -}}
{{- $k := .Values.kafka -}}
{{- if eq $k.mode "strimzi" -}}
{{- $cluster := include "rlhf.strimziCluster" . -}}
{{- if eq $k.strimzi.listener "tls" }}
bootstrap: {{ printf "%s-kafka-bootstrap:9093" $cluster }}
protocol: SASL_SSL
mechanism: SCRAM-SHA-512
username: {{ include "rlhf.strimziUser" . }}
passwordSecret: {name: {{ include "rlhf.strimziUser" . }}, key: password}
caSecret: {name: {{ printf "%s-cluster-ca-cert" $cluster }}, key: ca.crt}
clientCertSecret: {name: ""}
ports: [9093]
{{- else }}
bootstrap: {{ printf "%s-kafka-bootstrap:9092" $cluster }}
protocol: PLAINTEXT
mechanism: ""
username: ""
passwordSecret: {name: ""}
caSecret: {name: ""}
clientCertSecret: {name: ""}
ports: [9092]
{{- end }}
peers:
  - podSelector:
      matchLabels:
        strimzi.io/cluster: {{ $cluster }}
        strimzi.io/kind: Kafka
{{- else }}
bootstrap: {{ $k.external.bootstrap | quote }}
protocol: {{ $k.security.protocol }}
mechanism: {{ $k.security.sasl.mechanism | quote }}
username: {{ $k.security.sasl.username | quote }}
passwordSecret: {{ toYaml $k.security.sasl.passwordSecret | nindent 2 }}
caSecret: {{ toYaml $k.security.tls.caSecret | nindent 2 }}
clientCertSecret: {{ toYaml $k.security.tls.clientCertSecret | nindent 2 }}
ports: {{ toJson $k.external.ports }}
peers: {{ toJson $k.external.peers }}
{{- end }}
{{- end -}}

{{/* The per-component value (probes) merged over the chart-wide default. */}}
{{- define "rlhf.probe" -}}
{{- $base := index .root.Values.probes .kind -}}
{{- $own := dict -}}
{{- with .v.probes }}{{ $own = index . $.kind | default dict }}{{ end -}}
{{- $p := merge (deepCopy $own) (deepCopy $base) -}}
{{- if .root.Values.tls.enabled }}
tcpSocket:
  port: grpc
{{- else }}
grpc:
  port: {{ .c.port }}
{{- end }}
periodSeconds: {{ $p.periodSeconds }}
failureThreshold: {{ $p.failureThreshold }}
timeoutSeconds: {{ $p.timeoutSeconds }}
{{- end -}}

{{/* A component's image reference. */}}
{{- define "rlhf.image" -}}
{{- $img := .root.Values.image -}}
{{- $own := .v.image | default dict -}}
{{- $repo := $own.repository | default (printf "%s-%s" $img.repository .c.dns) -}}
{{- $tag := $own.tag | default $img.tag -}}
{{- if eq .c.dns "policy" }}{{ $tag = printf "%s-%s" $tag .v.variant }}{{ end -}}
{{- $registry := $own.registry | default $img.registry -}}
{{- if $registry }}{{ printf "%s/%s:%s" $registry $repo $tag }}{{ else }}{{ printf "%s:%s" $repo $tag }}{{ end -}}
{{- end -}}
