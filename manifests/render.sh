#!/usr/bin/env bash
# Renders the plain manifests from the Helm chart (manifests/chart), with its default values
# into istio-system: the chart is the one source, the plain files are what `helm template`
# prints. Edit the chart, then run this; istiod-lite/tests/k8s_manifests.rs fails when the
# plain files and the chart disagree.
#
#   bash manifests/render.sh            # rewrite the plain files
#   bash manifests/render.sh --check    # exit 1 (and show the diff) if any is stale
set -euo pipefail
cd "$(dirname "$0")"
helm=${MESH_HELM:-$(bash ../e2e/k8s/helm.sh)}
check=false
[ "${1:-}" = --check ] && check=true

# template → plain file
pairs=(
  "istiod.yaml istiod-lite/istiod-lite.yaml"
  "ztunnel.yaml ztunnel/ztunnel.yaml"
  "cni.yaml cni/cni-node.yaml"
  "gatewayclass.yaml waypoint/gatewayclass.yaml"
)
stale=0
for p in "${pairs[@]}"; do
  tpl=${p%% *} out=${p##* }
  new=$( {
    echo "# Rendered from manifests/chart/templates/$tpl by manifests/render.sh (the chart's"
    echo "# default values, namespace istio-system). Edit the chart, not this file."
    "$helm" template mesh chart --namespace istio-system --show-only "templates/$tpl" 2>/dev/null
  } )
  if $check; then
    if ! diff -u "$out" <(printf '%s\n' "$new") >&2; then
      echo "manifests/$out is stale: run bash manifests/render.sh" >&2
      stale=1
    fi
  else
    printf '%s\n' "$new" >"$out"
  fi
done
exit $stale
