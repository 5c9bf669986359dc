#!/usr/bin/env bash
# Stop what up.sh started in STATE and remove STATE.
#
#   bash e2e/k8s/down.sh STATE          # or MESH_K8S_STATE=STATE bash e2e/k8s/down.sh
#   MESH_K8S_KEEP_STATE=1 ...           # stop the processes but keep STATE (logs, PKI)
#
# Only the PIDs recorded in STATE/pids are signalled, and only while each is still the
# process that was started (its /proc start time matches); never by name. Idempotent.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/lib.sh"

state=${1:-${MESH_K8S_STATE:-}}
[ -n "$state" ] || k8s_die "usage: down.sh STATE"
if [ ! -e "$state" ]; then
  k8s_log "down: $state does not exist (already down)"
  exit 0
fi
[ -f "$state/.mesh-k8s-state" ] || k8s_die "$state was not made by up.sh (no .mesh-k8s-state marker); not touching it"

k8s_stop_recorded "$state"
rm -f "$state/pids"
if [ -f "$state/etcd-data-dir" ]; then
  d=$(cat "$state/etcd-data-dir")
  case $d in /dev/shm/mesh-k8s-etcd.* | "$state"/*) rm -rf "$d" ;; esac
  rm -f "$state/etcd-data-dir"
fi
if [ "${MESH_K8S_KEEP_STATE:-0}" = 1 ]; then
  k8s_log "down: processes stopped; state kept in $state"
else
  rm -rf "$state"
  k8s_log "down: removed $state"
fi
