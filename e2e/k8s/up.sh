#!/usr/bin/env bash
# Start a loopback-only control plane: etcd + kube-apiserver v1.20.2 (+ kube-controller-manager)
# in a per-run state directory, with throwaway openssl PKI, RBAC, and a kubeconfig.
#
#   bash e2e/k8s/up.sh [--no-kcm] [STATE]     # STATE: empty or new dir (or $MESH_K8S_STATE);
#                                              # default: a fresh mktemp -d
#   set -a; . STATE/env; set +a                # KUBECONFIG, APISERVER_URL, KUBECTL, ports, PIDs
#   bash e2e/k8s/down.sh STATE                 # stop exactly these processes, remove STATE
#
# The last line on stdout is the state directory. Everything binds 127.0.0.1. Ports are picked
# free at random (20000-32767) unless set: MESH_K8S_APISERVER_PORT, MESH_K8S_ETCD_PORT,
# MESH_K8S_ETCD_PEER_PORT, MESH_K8S_KCM_PORT. MESH_K8S_KCM=0 is the same as --no-kcm.
# MESH_K8S_READY_TIMEOUT (default 120 s) bounds the wait for /readyz.
# Binaries come from ${MESH_K8S_DIR:-/var/cache/mesh-k8s}/bin (run build.sh first).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/lib.sh"

kcm=${MESH_K8S_KCM:-1}
state=${MESH_K8S_STATE:-}
while [ $# -gt 0 ]; do
  case $1 in
  --no-kcm) kcm=0 ;;
  --kcm) kcm=1 ;;
  -h | --help) sed -n '2,16p' "$0"; exit 0 ;;
  -*) k8s_die "unknown flag $1" ;;
  *) state=$1 ;;
  esac
  shift
done
timeout_s=${MESH_K8S_READY_TIMEOUT:-120}

for b in kube-apiserver kube-controller-manager kubectl; do
  [ -x "$MESH_K8S_BIN/$b" ] || k8s_die "$MESH_K8S_BIN/$b missing: run e2e/k8s/build.sh (or set MESH_K8S_DIR)"
done
ETCD=$(command -v etcd) || k8s_die "etcd not found: run e2e/k8s/build.sh (installs etcd-server)"
for c in openssl curl; do command -v $c >/dev/null || k8s_die "$c not found: run e2e/k8s/build.sh"; done

# --- state directory ---------------------------------------------------------------------------
created_state=0
if [ -z "$state" ]; then
  state=$(mktemp -d "${TMPDIR:-/tmp}/mesh-k8s.XXXXXX")
  created_state=1
elif [ ! -e "$state" ]; then
  mkdir -p "$state"
  created_state=1
else
  [ -d "$state" ] || k8s_die "$state is not a directory"
  [ -z "$(ls -A "$state")" ] || k8s_die "state dir $state is not empty (already up? use down.sh $state)"
fi
state=$(cd "$state" && pwd)
: >"$state/.mesh-k8s-state" # marker: down.sh only removes directories carrying it
mkdir -p "$state/pki" "$state/logs"
: >"$state/pids"

ok=0
on_exit() {
  local rc=$?
  [ $ok = 1 ] && return 0
  printf '\n[k8s] up.sh FAILED (rc %s); state %s\n' "$rc" "$state" >&2
  k8s_dump_logs "$state" 40
  k8s_stop_recorded "$state"
  if [ -f "$state/etcd-data-dir" ]; then rm -rf "$(cat "$state/etcd-data-dir")"; fi
  if [ $created_state = 1 ] && [ "${MESH_K8S_KEEP_STATE:-0}" != 1 ]; then
    rm -rf "$state"
  else
    rm -f "$state/pids"
    k8s_log "logs left in $state/logs"
  fi
  exit "$rc"
}
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

t0=$(k8s_now)

# --- ports -------------------------------------------------------------------------------------
chosen=" "
port_in_use() { (: </dev/tcp/127.0.0.1/"$1") 2>/dev/null; }
pick_port() { # VAR: from the env override, else a free random port not chosen yet
  local var=$1 p=${!1:-} tries=0
  if [ -n "$p" ]; then
    port_in_use "$p" && k8s_die "$var=$p is already in use on 127.0.0.1"
  else
    while :; do
      p=$((20000 + RANDOM % 12768))
      tries=$((tries + 1))
      [ $tries -lt 200 ] || k8s_die "no free port found"
      case $chosen in *" $p "*) continue ;; esac
      port_in_use "$p" || break
    done
  fi
  chosen="$chosen$p "
  printf -v "$var" '%s' "$p"
}
pick_port MESH_K8S_ETCD_PORT
pick_port MESH_K8S_ETCD_PEER_PORT
pick_port MESH_K8S_APISERVER_PORT
pick_port MESH_K8S_KCM_PORT
EP=$MESH_K8S_ETCD_PORT PP=$MESH_K8S_ETCD_PEER_PORT AP=$MESH_K8S_APISERVER_PORT KP=$MESH_K8S_KCM_PORT
APISERVER_URL=https://127.0.0.1:$AP

# --- PKI (openssl, throwaway) --------------------------------------------------------------------
pki=$state/pki
ossl() {
  openssl "$@" 2>>"$state/logs/openssl.log" >/dev/null ||
    k8s_die "openssl $1 failed: $(tail -n 5 "$state/logs/openssl.log")"
}
eckey() { ossl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1"; }
sign() { # NAME SUBJECT EXTENSIONS: NAME.key + NAME.crt signed by the CA
  eckey "$pki/$1.key"
  ossl req -new -key "$pki/$1.key" -subj "$2" -out "$pki/$1.csr"
  printf '%b\n' "$3" >"$pki/$1.ext"
  ossl x509 -req -in "$pki/$1.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial \
    -CAserial "$pki/ca.srl" -days 365 -sha256 -extfile "$pki/$1.ext" -out "$pki/$1.crt"
  rm -f "$pki/$1.csr" "$pki/$1.ext"
}
eckey "$pki/ca.key"
ossl req -x509 -new -key "$pki/ca.key" -subj "/CN=mesh-k8s-ca" -days 365 -sha256 \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
  -out "$pki/ca.crt"
sign apiserver "/CN=kube-apiserver" "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,IP:127.0.0.1,IP:10.96.0.1"
sign admin "/O=system:masters/CN=mesh-admin" "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth"
# Service-account token signing key pair (RS256).
ossl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$pki/sa.key"
ossl pkey -in "$pki/sa.key" -pubout -out "$pki/sa.pub"
# A static bearer token for the admin too (handy for curl and for clients without certs).
ADMIN_TOKEN=$(openssl rand -hex 24)
printf '%s,mesh-admin,mesh-admin,"system:masters"\n' "$ADMIN_TOKEN" >"$pki/tokens.csv"
chmod 600 "$pki"/*.key "$pki/tokens.csv"

b64() { base64 -w0 <"$1"; }
write_kubeconfig() { # FILE
  cat >"$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: mesh-k8s
  cluster:
    server: $APISERVER_URL
    certificate-authority-data: $(b64 "$pki/ca.crt")
users:
- name: mesh-admin
  user:
    client-certificate-data: $(b64 "$pki/admin.crt")
    client-key-data: $(b64 "$pki/admin.key")
contexts:
- name: mesh-k8s
  context:
    cluster: mesh-k8s
    user: mesh-admin
    namespace: default
current-context: mesh-k8s
EOF
  chmod 600 "$1"
}
write_kubeconfig "$state/kubeconfig"
write_kubeconfig "$state/kcm.kubeconfig" # KCM's own copy: tests may edit the main one
t_pki=$(k8s_elapsed "$t0")

# --- processes ---------------------------------------------------------------------------------
start() { # NAME CMD...: run in the background, log to logs/NAME.log, record "name pid starttime",
  # set last_pid
  local name=$1
  shift
  "$@" </dev/null >"$state/logs/$name.log" 2>&1 &
  local pid=$! st
  st=$(k8s_starttime "$pid")
  [ -n "$st" ] || k8s_die "$name exited immediately"
  echo "$name $pid $st" >>"$state/pids"
  last_pid=$pid
}
wait_for() { # NAME PID TIMEOUT CMD...: poll CMD every 0.2 s while PID lives
  local name=$1 pid=$2 limit=$3 t
  shift 3
  t=$(k8s_now)
  while ! "$@" >/dev/null 2>&1; do
    [ -n "$(k8s_starttime "$pid")" ] ||
      k8s_die "$name (pid $pid) exited before becoming ready; see $state/logs/$name.log"
    awk -v a="$t" -v b="$(k8s_now)" -v l="$limit" 'BEGIN { exit !(b - a > l) }' &&
      k8s_die "$name not ready after ${limit}s (probe: $*)"
    sleep 0.2
  done
}

# etcd's data goes to tmpfs when available: fsync latency on a disk shared with compilers
# makes etcd (and so the apiserver) slow and flaky.
if [ -d /dev/shm ] && [ -w /dev/shm ] && [ "${MESH_K8S_ETCD_ON_DISK:-0}" != 1 ]; then
  etcd_data=$(mktemp -d /dev/shm/mesh-k8s-etcd.XXXXXX)
else
  etcd_data=$state/etcd
fi
echo "$etcd_data" >"$state/etcd-data-dir"
start etcd "$ETCD" --name mesh --data-dir "$etcd_data" --logger zap --log-outputs stderr \
  --listen-client-urls "http://127.0.0.1:$EP" --advertise-client-urls "http://127.0.0.1:$EP" \
  --listen-peer-urls "http://127.0.0.1:$PP" --initial-advertise-peer-urls "http://127.0.0.1:$PP" \
  --initial-cluster "mesh=http://127.0.0.1:$PP" --initial-cluster-state new \
  --initial-cluster-token "mesh-$(basename "$state")"
pid_etcd=$last_pid
wait_for etcd "$pid_etcd" 30 curl -fsS "http://127.0.0.1:$EP/health"
t_etcd=$(k8s_elapsed "$t0")

SA_ISSUER=https://kubernetes.default.svc.cluster.local
# ServiceAccount admission is off (as in Recipe A): with it, a pod is refused until KCM has made
# the SA's legacy token Secret, which races with tests. Side effect: spec.serviceAccountName
# is not defaulted to "default"; tests set it. The endpoint reconciler is off because Endpoints
# may not hold a loopback address (the default/kubernetes Service exists, without endpoints).
start kube-apiserver "$MESH_K8S_BIN/kube-apiserver" \
  --etcd-servers="http://127.0.0.1:$EP" \
  --bind-address=127.0.0.1 --advertise-address=127.0.0.1 --secure-port="$AP" --insecure-port=0 \
  --cert-dir="$pki" --tls-cert-file="$pki/apiserver.crt" --tls-private-key-file="$pki/apiserver.key" \
  --client-ca-file="$pki/ca.crt" --token-auth-file="$pki/tokens.csv" \
  --service-account-issuer="$SA_ISSUER" --service-account-key-file="$pki/sa.pub" \
  --service-account-signing-key-file="$pki/sa.key" \
  --api-audiences="$SA_ISSUER,istio-ca" \
  --service-cluster-ip-range=10.96.0.0/16 \
  --endpoint-reconciler-type=none \
  --authorization-mode=RBAC \
  --disable-admission-plugins=ServiceAccount \
  --allow-privileged=true \
  --profiling=false
pid_kube_apiserver=$last_pid
kcurl() { curl -fsS --cacert "$pki/ca.crt" --cert "$pki/admin.crt" --key "$pki/admin.key" "$@"; }
wait_for kube-apiserver "$pid_kube_apiserver" "$timeout_s" kcurl "$APISERVER_URL/readyz"
t_ready=$(k8s_elapsed "$t0")

pid_kube_controller_manager=
if [ "$kcm" = 1 ]; then
  start kube-controller-manager "$MESH_K8S_BIN/kube-controller-manager" \
    --kubeconfig="$state/kcm.kubeconfig" \
    --authentication-kubeconfig="$state/kcm.kubeconfig" \
    --authorization-kubeconfig="$state/kcm.kubeconfig" \
    --bind-address=127.0.0.1 --secure-port="$KP" --port=0 \
    --tls-cert-file="$pki/apiserver.crt" --tls-private-key-file="$pki/apiserver.key" \
    --service-account-private-key-file="$pki/sa.key" --root-ca-file="$pki/ca.crt" \
    --cluster-signing-cert-file="$pki/ca.crt" --cluster-signing-key-file="$pki/ca.key" \
    --leader-elect=false \
    --controllers='*,-nodelifecycle,-nodeipam,-ttl,-cloud-node-lifecycle' \
    --profiling=false
  pid_kube_controller_manager=$last_pid
  wait_for kube-controller-manager "$pid_kube_controller_manager" 60 \
    curl -fsS --cacert "$pki/ca.crt" "https://127.0.0.1:$KP/healthz"
fi
t_all=$(k8s_elapsed "$t0")

cat >"$state/env" <<EOF
MESH_K8S_STATE=$state
KUBECONFIG=$state/kubeconfig
KUBECTL=$MESH_K8S_BIN/kubectl
APISERVER_URL=$APISERVER_URL
APISERVER_PORT=$AP
ETCD_URL=http://127.0.0.1:$EP
ETCD_PORT=$EP
ETCD_PEER_PORT=$PP
KCM_PORT=$KP
CA_CERT=$pki/ca.crt
ADMIN_CERT=$pki/admin.crt
ADMIN_KEY=$pki/admin.key
ADMIN_TOKEN=$ADMIN_TOKEN
SA_ISSUER=$SA_ISSUER
SA_AUDIENCES=$SA_ISSUER,istio-ca
SERVICE_CIDR=10.96.0.0/16
K8S_VERSION=$MESH_K8S_VERSION
ETCD_PID=$pid_etcd
APISERVER_PID=$pid_kube_apiserver
KCM_PID=$pid_kube_controller_manager
READY_SECONDS=$t_ready
EOF
ok=1
k8s_log "up: $APISERVER_URL $MESH_K8S_VERSION (etcd :$EP pid $pid_etcd, apiserver pid $pid_kube_apiserver${pid_kube_controller_manager:+, kcm :$KP pid $pid_kube_controller_manager})"
k8s_log "timings: pki ${t_pki}s, etcd healthy ${t_etcd}s, apiserver /readyz ${t_ready}s, all ${t_all}s"
k8s_log "use: set -a; . $state/env; set +a; \$KUBECTL get ns   |   stop: bash $here/down.sh $state"
echo "$state"
