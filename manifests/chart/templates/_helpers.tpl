{{/* The image of a component: its own `image`, else <hub>/<name>:<tag>. */}}
{{- define "mesh.image" -}}
{{- if .image -}}{{ .image }}{{- else -}}{{ .root.Values.hub }}/{{ .name }}:{{ .root.Values.tag }}{{- end -}}
{{- end }}

{{/* The address ztunnels and waypoints dial for xDS and the CA. */}}
{{- define "mesh.istiodAddress" -}}
https://istiod.{{ .Release.Namespace }}.svc:15012
{{- end }}

{{/* Extra environment from a map (name: value), sorted by name, indented by `indent`. */}}
{{- define "mesh.env" -}}
{{- range $k, $v := .env }}
{{ printf "- name: %s\n  value: %s" $k ($v | toString | quote) | indent $.indent }}
{{- end }}
{{- end }}
