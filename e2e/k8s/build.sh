#!/usr/bin/env bash
# Build a real kube-apiserver and kube-controller-manager (Kubernetes v1.20.2) from Debian
# bookworm's `kubernetes` source package with Debian's golang-go, and cache them in
# ${MESH_K8S_DIR:-/var/cache/mesh-k8s}/bin together with kubectl 1.20 (unpacked from Debian's
# kubernetes-client .deb, so the system kubectl is left alone). etcd comes from etcd-server.
#
#   bash e2e/k8s/build.sh            # no-op (< 1 s) when the cached binaries report v1.20.2
#   KEEP_SRC=1 bash e2e/k8s/build.sh # keep the ~2.2 GB work tree (source, Go cache)
#   FORCE=1 bash e2e/k8s/build.sh    # rebuild even if cached
#
# Only Debian's package archive is contacted (apt-get install / download / source). Needs
# root when packages are missing (CI runs it as root).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/lib.sh"

# Exact Debian source version (bookworm / bookworm-security) that carries v1.20.2 + vendor/.
DEB_SRC_VERSION=1.20.5+really1.20.2-1.1+deb12u1
KUBE_GIT_COMMIT=faecb196815e248d3ecfb03c680a4507229c2a56 # v1.20.2
DL=$MESH_K8S_DIR/dl     # downloaded source package (~35 MB, kept)
WORK=$MESH_K8S_DIR/work # extracted tree + Go caches (~2.2 GB, removed after success)
t_total=$(k8s_now)

timing() { k8s_log "step '$1' took $(k8s_elapsed "$2") s"; }

mkdir -p "$MESH_K8S_DIR" 2>/dev/null || k8s_die "cannot create $MESH_K8S_DIR (set MESH_K8S_DIR to a writable directory)"
[ -w "$MESH_K8S_DIR" ] || k8s_die "$MESH_K8S_DIR is not writable (set MESH_K8S_DIR)"

# One build at a time per cache directory (two smoke runs in parallel must not race).
exec 9>"$MESH_K8S_DIR/.build.lock"
flock 9

# --- cached? -------------------------------------------------------------------------------
bin_ok() { # NAME: the cached binary exists and reports the expected version
  local out
  [ -x "$MESH_K8S_BIN/$1" ] || return 1
  case $1 in
  kubectl) out=$("$MESH_K8S_BIN/kubectl" version --client --short 2>/dev/null) || return 1 ;;
  *) out=$("$MESH_K8S_BIN/$1" --version 2>/dev/null) || return 1 ;;
  esac
  case $out in *"$MESH_K8S_VERSION"*) return 0 ;; *) return 1 ;; esac
}

# --- apt -----------------------------------------------------------------------------------
apt_updated=0
apt_update() {
  [ $apt_updated = 1 ] && return 0
  local t; t=$(k8s_now)
  k8s_log "apt-get update"
  apt-get update -qq
  apt_updated=1
  timing apt-update "$t"
}
apt_install() { # PKG... (only the missing ones are installed)
  local -a missing=()
  local p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  [ "$(id -u)" = 0 ] || k8s_die "need root to install: ${missing[*]}"
  apt_update
  local t; t=$(k8s_now)
  k8s_log "apt-get install ${missing[*]}"
  # Never let a package start a daemon (etcd-server would start a system etcd on :2379).
  local made_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 0755 /usr/sbin/policy-rc.d
    made_policy=1
  fi
  local rc=0
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" || rc=$?
  [ $made_policy = 1 ] && rm -f /usr/sbin/policy-rc.d
  [ $rc = 0 ] || k8s_die "apt-get install failed (rc $rc)"
  timing apt-install "$t"
}

# From the versions apt offers (one per line): the pinned one, else the newest Debian
# revision of the same upstream (the archive keeps only the latest revision of a suite).
pick_version() {
  local v
  if grep -qxF "$DEB_SRC_VERSION" <<<"$1"; then
    echo "$DEB_SRC_VERSION"
    return 0
  fi
  v=$(grep -F '+really1.20.2-' <<<"$1" | sort -V | tail -n1)
  [ -n "$v" ] || return 1
  k8s_log "WARNING: $DEB_SRC_VERSION not offered by apt; using $v (same upstream v1.20.2)"
  echo "$v"
}

# Runtime dependencies of up.sh / smoke.sh: always ensured (cheap when present).
apt_install etcd-server openssl curl jq ca-certificates

# kubectl 1.20 from Debian's kubernetes-client, unpacked into the cache. Installing the package
# itself would clash with a kubectl already on the system (e.g. Google's, v1.32 dispatcher),
# and kubectl should be within one minor version of the 1.20 server.
if [ "${FORCE:-0}" = 1 ] || ! bin_ok kubectl; then
  t=$(k8s_now)
  apt_update
  tmp=$(mktemp -d "$MESH_K8S_DIR/kubectl.XXXXXX")
  v=$(pick_version "$(apt-cache madison kubernetes-client | awk -F'|' '{ gsub(/ /, "", $2); print $2 }')") ||
    k8s_die "apt offers no kubernetes-client 1.20.5+really1.20.2"
  (cd "$tmp" && apt-get download -qq -o APT::Sandbox::User=root "kubernetes-client=$v")
  dpkg-deb -x "$tmp"/kubernetes-client_*.deb "$tmp/root"
  install -D -m 0755 "$tmp/root/usr/bin/kubectl" "$MESH_K8S_BIN/kubectl"
  rm -rf "$tmp"
  bin_ok kubectl || k8s_die "unpacked kubectl does not report $MESH_K8S_VERSION: $("$MESH_K8S_BIN/kubectl" version --client --short 2>&1)"
  timing kubectl "$t"
fi

if [ "${FORCE:-0}" != 1 ] && bin_ok kube-apiserver && bin_ok kube-controller-manager; then
  k8s_log "cached: $MESH_K8S_BIN/{kube-apiserver,kube-controller-manager,kubectl} are $MESH_K8S_VERSION (total $(k8s_elapsed "$t_total") s)"
  exit 0
fi

# --- build dependencies + source -------------------------------------------------------------
apt_install golang-go rsync golang-github-modern-go-reflect2-dev make

# Only the upstream tarball is used (Debian's own patches touch kubectl alone). Pinned by hash,
# so any Debian revision of 1.20.5+really1.20.2 builds the same source, and a warm dl/ needs
# no network at all.
ORIG=$DL/kubernetes_1.20.5+really1.20.2.orig.tar.gz
ORIG_SHA256=b83c0780efb182d928dc63d46488a847f161f04e40a94b96bf5247dd671ecdfc
have_orig() { [ -f "$ORIG" ] && echo "$ORIG_SHA256  $ORIG" | sha256sum --quiet -c - >/dev/null 2>&1; }
src_versions() { apt-cache showsrc kubernetes 2>/dev/null | sed -n 's/^Version: //p'; }
if ! have_orig; then
  # `apt-get source` needs deb-src entries. Add them (same mirrors and suites as the binary
  # entries) only if apt knows no source of kubernetes 1.20.2.
  if ! src_versions | grep -qF '+really1.20.2-'; then
    eval "$(apt-config shell SP Dir::Etc::sourceparts/d)"
    SP=${SP%/}
    if [ -f "$SP/debian.sources" ]; then
      sed -n '/^Types:/!{p;d}; s/^Types:.*/Types: deb-src/p' "$SP/debian.sources" >"$SP/mesh-k8s-deb-src.sources"
    elif [ -f /etc/apt/sources.list ] && grep -q '^deb ' /etc/apt/sources.list; then
      sed -n 's/^deb \(.*\)/deb-src \1/p' /etc/apt/sources.list >"$SP/mesh-k8s-deb-src.list"
    else
      k8s_die "no deb-src for kubernetes and no debian.sources/sources.list to derive it from"
    fi
    k8s_log "added deb-src entries in $SP/mesh-k8s-deb-src.*"
    apt_updated=0
    apt_update
  fi
  v=$(pick_version "$(src_versions)") ||
    k8s_die "apt offers no source kubernetes 1.20.5+really1.20.2 (has: $(src_versions | tr '\n' ' '))"
  t=$(k8s_now)
  mkdir -p "$DL"
  k8s_log "apt-get source --download-only kubernetes=$v"
  (cd "$DL" && apt-get source -qq -o APT::Sandbox::User=root --download-only "kubernetes=$v")
  have_orig || k8s_die "$ORIG missing or its sha256 is not $ORIG_SHA256"
  timing download "$t"
fi
orig=$ORIG

# --- extract + patch ---------------------------------------------------------------------------
t=$(k8s_now)
rm -rf "$WORK/src"
mkdir -p "$WORK/src"
tar -C "$WORK/src" -xzf "$orig"
SRC=$(find "$WORK/src" -mindepth 1 -maxdepth 1 -type d | head -n1)
{ [ -d "$SRC/cmd/kube-apiserver" ] && [ -d "$SRC/vendor" ]; } || k8s_die "unexpected tarball layout in $orig"
timing extract "$t"

# Patch 1: vendored reflect2 v1.0.1 breaks under Go >= 1.18 (unsafe map iteration used by
# json-iterator); replace it with Debian's golang-github-modern-go-reflect2-dev (1.0.2).
R=$SRC/vendor/github.com/modern-go/reflect2
D=$(dirname "$(dpkg -L golang-github-modern-go-reflect2-dev | grep '/reflect2\.go$' | head -n1)")
[ -f "$D/reflect2.go" ] || k8s_die "reflect2 sources not found in golang-github-modern-go-reflect2-dev"
rm -f "$R"/*.go "$R"/*.s
cp "$D"/*.go "$D"/*.s "$R"/
rm -f "$R"/*_test.go
[ -f "$R/go_above_118.go" ] || k8s_die "patch 1 (reflect2 1.0.2) did not apply: $R/go_above_118.go missing"
k8s_log "patch 1: vendor/github.com/modern-go/reflect2 replaced from $D"

# Patch 2: kubernetes/kubernetes#99804 (fixed upstream by #99817). With Go >= 1.16, empty
# strings in custom resources are rejected as 'Invalid value: "null"'. Drop the zero-value test.
old='if data == nil || reflect.DeepEqual(reflect.Zero(reflect.TypeOf(data)), reflect.ValueOf(data)) {'
for f in vendor/k8s.io/kube-openapi/pkg/validation/validate/type.go vendor/github.com/go-openapi/validate/type.go; do
  p=$SRC/$f
  [ -f "$p" ] || k8s_die "patch 2: $f does not exist"
  n=$(grep -cF "$old" "$p" || true)
  [ "$n" = 1 ] || k8s_die "patch 2: expected exactly 1 match of the zero-value check in $f, found $n"
  sed -i 's/if data == nil || reflect\.DeepEqual(reflect\.Zero(reflect\.TypeOf(data)), reflect\.ValueOf(data)) {/if data == nil {/' "$p"
  if grep -qF "$old" "$p" || ! grep -q '^[[:space:]]*if data == nil {$' "$p"; then
    k8s_die "patch 2: sed did not rewrite $f"
  fi
  k8s_log "patch 2: $f"
done

# --- build -------------------------------------------------------------------------------------
t=$(k8s_now)
k8s_log "make WHAT='cmd/kube-apiserver cmd/kube-controller-manager' (codegen ~1 min, then compile; go: $(go version))"
mkdir -p "$WORK/home"
(
  cd "$SRC"
  # GOPATH mode (hack/lib/init.sh sets GO111MODULE=off); version stamped explicitly since the
  # tarball has no .git.
  export HOME=$WORK/home GOCACHE=$WORK/gocache GOFLAGS='' CGO_ENABLED=0 \
    KUBE_BUILD_PLATFORMS=linux/amd64 KUBE_GIT_VERSION=$MESH_K8S_VERSION KUBE_GIT_MAJOR=1 \
    KUBE_GIT_MINOR=20 KUBE_GIT_TREE_STATE=clean KUBE_GIT_COMMIT=$KUBE_GIT_COMMIT
  make WHAT="cmd/kube-apiserver cmd/kube-controller-manager"
) >"$MESH_K8S_DIR/build.log" 2>&1 || {
  tail -n 60 "$MESH_K8S_DIR/build.log" >&2
  k8s_die "make failed; full log: $MESH_K8S_DIR/build.log (work tree kept in $WORK)"
}
timing make "$t"

for b in kube-apiserver kube-controller-manager; do
  install -D -m 0755 "$SRC/_output/bin/$b" "$MESH_K8S_BIN/$b.new"
  mv -f "$MESH_K8S_BIN/$b.new" "$MESH_K8S_BIN/$b"
  bin_ok "$b" || k8s_die "$b does not report $MESH_K8S_VERSION: $("$MESH_K8S_BIN/$b" --version 2>&1)"
done
du_work=$(du -sh "$WORK" 2>/dev/null | cut -f1)
if [ "${KEEP_SRC:-0}" = 1 ]; then
  k8s_log "KEEP_SRC=1: work tree kept in $WORK ($du_work)"
else
  rm -rf "$WORK"
  k8s_log "removed work tree $WORK ($du_work); set KEEP_SRC=1 to keep it"
fi
ls -l "$MESH_K8S_BIN" >&2
k8s_log "built $MESH_K8S_VERSION into $MESH_K8S_BIN in $(k8s_elapsed "$t_total") s total"
