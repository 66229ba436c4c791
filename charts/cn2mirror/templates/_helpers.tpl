{{/* Labels Helm adds to every object (the kustomize base has the rest). */}}
{{- define "cn2mirror.helmLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "cn2mirror.image" -}}
{{ printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/* A manifest of the kustomize base as a dict, moved to the release's namespace and
     labelled as Helm's. */}}
{{- define "cn2mirror.load" -}}
{{- $ctx := index . 0 -}}
{{- $obj := $ctx.Files.Get (index . 1) | fromYaml -}}
{{- if $obj.metadata.namespace }}{{ $_ := set $obj.metadata "namespace" $ctx.Release.Namespace }}{{ end -}}
{{- $_ := set $obj.metadata "labels" (merge (include "cn2mirror.helmLabels" $ctx | fromYaml) ($obj.metadata.labels | default dict)) -}}
{{- range $s := ($obj.subjects | default list) }}{{ $_ := set $s "namespace" $ctx.Release.Namespace }}{{ end -}}
{{- toYaml $obj -}}
{{- end }}

{{/* The image and pull policy of every container of a pod spec. */}}
{{- define "cn2mirror.setImages" -}}
{{- $ctx := index . 0 -}}
{{- range $c := concat ((index . 1).initContainers | default list) (index . 1).containers }}
{{- $_ := set $c "image" (include "cn2mirror.image" $ctx) }}
{{- $_ := set $c "imagePullPolicy" $ctx.Values.image.pullPolicy }}
{{- end }}
{{- end }}

{{/* An agent argument --NAME=VALUE set to a value (others untouched). */}}
{{- define "cn2mirror.args" -}}
{{- $args := list -}}
{{- $values := index . 1 -}}
{{- range $a := (index . 0) -}}
{{- $name := regexReplaceAll "=.*$" $a "" -}}
{{- $v := get $values $name -}}
{{- if $v }}{{ $args = append $args (printf "%s=%s" $name $v) }}{{ else }}{{ $args = append $args $a }}{{ end -}}
{{- end -}}
{{- toYaml $args -}}
{{- end }}
