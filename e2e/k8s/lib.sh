# Shared helpers for e2e/k8s/*.sh (sourced, not executed).
#
# Everything here is about a loopback-only Kubernetes control plane (etcd, kube-apiserver,
# kube-controller-manager) built by build.sh into a cache directory.

# The one version this facility builds and runs. build.sh checks `--version` against it.
# shellcheck disable=SC2034 # used by the scripts that source this file
MESH_K8S_VERSION=v1.20.2
MESH_K8S_DIR=${MESH_K8S_DIR:-/var/cache/mesh-k8s}
# shellcheck disable=SC2034
MESH_K8S_BIN=$MESH_K8S_DIR/bin

k8s_log() { printf '[k8s %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
k8s_die() { printf '[k8s] ERROR: %s\n' "$*" >&2; exit 1; }

# Seconds since the epoch with milliseconds, for timings.
k8s_now() { date +%s.%N | cut -c1-14; }
k8s_elapsed() { awk -v a="$1" -v b="$(k8s_now)" 'BEGIN { printf "%.1f", b - a }'; }

# Start time (clock ticks since boot, field 22 of /proc/PID/stat) of a live process, or empty.
# Recorded next to each PID so that a PID reused by an unrelated process is never signalled.
k8s_starttime() {
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 0
  # Field 2 (comm) may contain spaces; drop everything up to the last ')'.
  stat=${stat##*) }
  # Now field 1 is the state (original field 3); starttime is original field 22.
  # shellcheck disable=SC2086 # split into fields on purpose (numbers only, no globs)
  set -- $stat
  [ "$1" = Z ] && return 0 # a zombie counts as gone
  echo "${20}"
}

# True while PID is alive, not a zombie, and still the process started at STARTTIME.
k8s_same_process() {
  local now
  now=$(k8s_starttime "$1")
  [ -n "$now" ] && [ "$now" = "$2" ]
}

# Stop the processes listed in STATE/pids ("name pid starttime" lines), last started first:
# SIGTERM, up to 15 s grace, then SIGKILL. Only exact recorded PIDs are signalled.
k8s_stop_recorded() {
  local state=$1 name pid st i
  [ -f "$state/pids" ] || return 0
  local -a lines=()
  mapfile -t lines <"$state/pids"
  for ((i = ${#lines[@]} - 1; i >= 0; i--)); do
    read -r name pid st <<<"${lines[$i]}"
    [ -n "${pid:-}" ] || continue
    if ! k8s_same_process "$pid" "$st"; then
      k8s_log "$name (pid $pid) already gone"
      continue
    fi
    kill -TERM "$pid" 2>/dev/null || true
    local waited=0
    while k8s_same_process "$pid" "$st" && [ $waited -lt 150 ]; do
      sleep 0.1
      waited=$((waited + 1))
    done
    if k8s_same_process "$pid" "$st"; then
      k8s_log "$name (pid $pid) ignored SIGTERM for 15 s; SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      sleep 0.2
    fi
    k8s_log "stopped $name (pid $pid)"
  done
}

# Print the last lines of each log in STATE (used on every failure path).
k8s_dump_logs() {
  local state=$1 n=${2:-40} f
  for f in "$state"/logs/*.log; do
    [ -f "$f" ] || continue
    case $f in */openssl.log) continue ;; esac # key-generation noise; shown by up.sh if openssl fails
    printf '\n----- last %s lines of %s -----\n' "$n" "$f" >&2
    tail -n "$n" "$f" >&2
  done
}
