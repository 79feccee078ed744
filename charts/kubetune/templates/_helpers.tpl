{{/*
The chart name, trimmed to 63 characters (DNS label).
*/}}
{{- define "kubetune.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Full name: <release>-<chart>, or the release name when it already contains the chart name.
*/}}
{{- define "kubetune.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
A name derived from the full name with a suffix, kept within 63 characters.
Usage: include "kubetune.suffixed" (list . "webhook")
*/}}
{{- define "kubetune.suffixed" -}}
{{- $ctx := index . 0 -}}
{{- $suffix := index . 1 -}}
{{- printf "%s-%s" (include "kubetune.fullname" $ctx | trunc (int (sub 62 (len $suffix))) | trimSuffix "-") $suffix -}}
{{- end -}}

{{- define "kubetune.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Selector labels: stable across upgrades (a Deployment's selector is immutable).
*/}}
{{- define "kubetune.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kubetune.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{/*
Standard labels for an object of a component.
Usage: include "kubetune.componentLabels" (list . "metrics")
*/}}
{{- define "kubetune.componentLabels" -}}
{{- $ctx := index . 0 -}}
helm.sh/chart: {{ include "kubetune.chart" $ctx }}
app.kubernetes.io/name: {{ include "kubetune.name" $ctx }}
app.kubernetes.io/instance: {{ $ctx.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- if $ctx.Chart.AppVersion }}
app.kubernetes.io/version: {{ $ctx.Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ $ctx.Release.Service }}
app.kubernetes.io/part-of: kubetune
{{- with $ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/*
Standard labels on every object of the operator component.
*/}}
{{- define "kubetune.labels" -}}
{{ include "kubetune.componentLabels" (list . "operator") }}
{{- end -}}

{{- define "kubetune.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "kubetune.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/*
An image reference from {repository, tag, digest}; the tag defaults to the appVersion, a digest pins.
Usage: include "kubetune.image" (list .Values.image .Chart.AppVersion)
*/}}
{{- define "kubetune.image" -}}
{{- $img := index . 0 -}}
{{- $appVersion := index . 1 -}}
{{- $tag := default $appVersion $img.tag | toString -}}
{{- if $img.digest -}}
{{- printf "%s:%s@%s" $img.repository $tag $img.digest -}}
{{- else -}}
{{- printf "%s:%s" $img.repository $tag -}}
{{- end -}}
{{- end -}}

{{- define "kubetune.webhookName" -}}
{{- include "kubetune.suffixed" (list . "webhook") -}}
{{- end -}}

{{- define "kubetune.webhookSecretName" -}}
{{- if .Values.webhook.certManager.enabled -}}
{{- include "kubetune.suffixed" (list . "webhook-tls") -}}
{{- else -}}
{{- required "webhook.existingSecret is required when webhook.certManager.enabled is false" .Values.webhook.existingSecret -}}
{{- end -}}
{{- end -}}

{{/*
Whether the operator watches every namespace (ClusterRole) or a list (Role per namespace).
*/}}
{{- define "kubetune.clusterWide" -}}
{{- if .Values.watch.namespaces -}}false{{- else -}}true{{- end -}}
{{- end -}}

{{/*
URL path of the operator's validating handler: kopf routes admission requests by handler id.
*/}}
{{- define "kubetune.webhookPath" -}}
/validate
{{- end -}}
