#!/usr/bin/env bash
# Smoke check of the loopback control plane: build (cached), up, exercise what the mesh's
# control plane relies on, down (always, via trap).
#
#   bash e2e/k8s/smoke.sh                 # `make k8s-smoke`
#   MESH_K8S_KEEP_STATE=1 bash e2e/k8s/smoke.sh   # keep logs/PKI of the run after it stops
#
# Checks: server version; default namespaces; an ambient-labelled namespace; ServiceAccount,
# Node, Pod with nodeName, Service; the pod's /status patched to Running/Ready (no kubelet
# here); the EndpointSlice (discovery.k8s.io/v1beta1) and Endpoints the controllers derive from
# it; KCM's default ServiceAccount; TokenRequest with audience istio-ca and its TokenReview
# (plus a wrong-audience negative control); force-delete and namespace deletion.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/lib.sh"

t_build=$(k8s_now)
bash "$here/build.sh"
build_s=$(k8s_elapsed "$t_build")

STATE=$(mktemp -d "${TMPDIR:-/tmp}/mesh-k8s-smoke.XXXXXX")
pass=0 fail=0
finish() {
  local rc=$?
  if [ $rc != 0 ] || [ $fail != 0 ]; then k8s_dump_logs "$STATE" 30; fi
  bash "$here/down.sh" "$STATE" || true
  exit $rc
}
trap finish EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

t_up=$(k8s_now)
bash "$here/up.sh" "$STATE" >/dev/null
up_s=$(k8s_elapsed "$t_up")
set -a
# shellcheck disable=SC1091
. "$STATE/env"
set +a

k() { "$KUBECTL" --kubeconfig "$KUBECONFIG" --request-timeout=30s "$@"; }
api() { # METHOD PATH [curl args...]: the API with the admin client cert, body on stdout
  local m=$1 p=$2
  shift 2
  curl -sS --fail-with-body --max-time 30 --cacert "$CA_CERT" --cert "$ADMIN_CERT" --key "$ADMIN_KEY" \
    -X "$m" "$APISERVER_URL$p" "$@"
}
expect() { # DESCRIPTION ACTUAL EXPECTED
  [ "$2" = "$3" ] || { echo "$1: got '$2', want '$3'"; return 1; }
}
retry() { # SECONDS CMD...: until CMD succeeds; its last output is shown on timeout
  local limit=$1 end out
  shift
  end=$((SECONDS + limit))
  until out=$("$@" 2>&1); do
    [ $SECONDS -lt $end ] || { echo "$out"; echo "(still failing after ${limit}s)"; return 1; }
    sleep 0.5
  done
  echo "$out"
}
check() { # NAME FUNCTION
  local out
  if out=$("$2" 2>&1); then
    pass=$((pass + 1))
    printf 'ok   %s\n' "$1"
  else
    fail=$((fail + 1))
    printf 'FAIL %s\n' "$1"
    printf '%s\n' "$out" | tail -n 25 | sed 's/^/     /'
  fi
}

NS=smoke-ambient SA=backend NODE=smoke-node-1 POD=echo-0 POD_IP=10.244.1.7

c_version() {
  expect "server gitVersion" "$(k version -o json | jq -r .serverVersion.gitVersion)" "$K8S_VERSION"
}
c_default_namespaces() {
  local ns
  ns=$(k get ns -o name)
  echo "$ns"
  grep -qx namespace/default <<<"$ns" && grep -qx namespace/kube-system <<<"$ns"
}
c_ambient_namespace() {
  k apply -f - <<EOF
apiVersion: v1
kind: Namespace
metadata:
  name: $NS
  labels:
    istio.io/dataplane-mode: ambient
EOF
  expect "namespaces labelled ambient" "$(k get ns -l istio.io/dataplane-mode=ambient -o name)" "namespace/$NS"
}
c_service_account() {
  k -n "$NS" create serviceaccount "$SA" || return 1
  k -n "$NS" get serviceaccount "$SA" -o name
}
c_node() {
  k apply -f - <<EOF || return 1
apiVersion: v1
kind: Node
metadata:
  name: $NODE
  labels:
    kubernetes.io/hostname: $NODE
    topology.kubernetes.io/zone: zone-a
EOF
  k get node "$NODE" -o name
}
c_pod() {
  k apply -f - <<EOF
apiVersion: v1
kind: Pod
metadata:
  name: $POD
  namespace: $NS
  labels:
    app: echo
spec:
  nodeName: $NODE
  serviceAccountName: $SA
  containers:
  - name: echo
    image: registry.invalid/echo:never-pulled
    ports:
    - name: http
      containerPort: 8080
EOF
  expect "pod nodeName" "$(k -n "$NS" get pod "$POD" -o jsonpath='{.spec.nodeName}')" "$NODE"
}
c_service() {
  k apply -f - <<EOF
apiVersion: v1
kind: Service
metadata:
  name: echo
  namespace: $NS
spec:
  selector:
    app: echo
  ports:
  - name: http
    port: 80
    targetPort: 8080
EOF
  local ip
  ip=$(k -n "$NS" get svc echo -o jsonpath='{.spec.clusterIP}')
  case $ip in 10.96.*) echo "clusterIP $ip" ;; *) echo "clusterIP '$ip' not in 10.96.0.0/16"; return 1 ;; esac
}
c_pod_status() {
  # The kubelet's job, done by hand: kubectl 1.20 has no --subresource, so PATCH /status.
  local now
  now=$(date -u +%Y-%m-%dT%H:%M:%SZ)
  api PATCH "/api/v1/namespaces/$NS/pods/$POD/status" -H 'Content-Type: application/merge-patch+json' \
    --data-binary @- >/dev/null <<EOF
{"status": {"phase": "Running", "hostIP": "127.0.0.1", "podIP": "$POD_IP", "podIPs": [{"ip": "$POD_IP"}],
 "startTime": "$now",
 "conditions": [{"type": "Initialized", "status": "True", "lastTransitionTime": "$now"},
                {"type": "ContainersReady", "status": "True", "lastTransitionTime": "$now"},
                {"type": "Ready", "status": "True", "lastTransitionTime": "$now"},
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": "$now"}]}}
EOF
  expect "phase/podIP/Ready" \
    "$(k -n "$NS" get pod "$POD" -o jsonpath='{.status.phase}/{.status.podIP}/{.status.conditions[?(@.type=="Ready")].status}')" \
    "Running/$POD_IP/True"
}
slice_ready() {
  local j
  j=$(k -n "$NS" get endpointslices.v1beta1.discovery.k8s.io -l kubernetes.io/service-name=echo -o json)
  jq -e --arg ip "$POD_IP" --arg pod "$POD" '
    [.items[] | select(.addressType == "IPv4") | . as $s | .endpoints[]
     | select((.addresses | index($ip)) and .conditions.ready == true and .targetRef.name == $pod
              and ($s.ports | any(.port == 8080 and .name == "http")))] | length == 1' <<<"$j" >/dev/null ||
    { jq -c '[.items[] | {endpoints, ports}]' <<<"$j"; return 1; }
  jq -c '.items[] | {name: .metadata.name, endpoints: [.endpoints[] | {addresses, conditions, topology}], ports}' <<<"$j"
}
c_endpointslice() { retry 60 slice_ready; }
endpoints_ready() {
  expect "Endpoints echo" "$(k -n "$NS" get endpoints echo -o jsonpath='{.subsets[0].addresses[0].ip}:{.subsets[0].ports[0].port}')" "$POD_IP:8080"
}
c_endpoints() { retry 30 endpoints_ready; }
c_kcm_default_sa() { retry 60 k -n "$NS" get serviceaccount default -o name; }
TOKEN=
c_token_request() {
  local resp payload
  resp=$(api POST "/api/v1/namespaces/$NS/serviceaccounts/$SA/token" -H 'Content-Type: application/json' \
    -d '{"apiVersion":"authentication.k8s.io/v1","kind":"TokenRequest","spec":{"audiences":["istio-ca"],"expirationSeconds":3600}}')
  TOKEN=$(jq -r '.status.token // empty' <<<"$resp")
  [ -n "$TOKEN" ] || { echo "no token in: $resp"; return 1; }
  echo "$TOKEN" >"$STATE/sa.token"
  # JWT claims (base64url, unpadded).
  payload=$(cut -d. -f2 <<<"$TOKEN" | tr '_-' '/+')
  while [ $((${#payload} % 4)) != 0 ]; do payload="$payload="; done
  payload=$(base64 -d <<<"$payload")
  jq -c '{iss, aud, sub}' <<<"$payload"
  jq -e --arg sub "system:serviceaccount:$NS:$SA" '(.aud | index("istio-ca")) and .sub == $sub' <<<"$payload" >/dev/null
}
token_review() { # AUDIENCE
  api POST /apis/authentication.k8s.io/v1/tokenreviews -H 'Content-Type: application/json' \
    -d "$(jq -nc --arg t "$(cat "$STATE/sa.token")" --arg a "$1" '{apiVersion:"authentication.k8s.io/v1",kind:"TokenReview",spec:{token:$t,audiences:[$a]}}')"
}
c_token_review() {
  local st
  st=$(token_review istio-ca | jq -c .status)
  echo "$st"
  jq -e --arg u "system:serviceaccount:$NS:$SA" \
    '.authenticated == true and .user.username == $u and (.audiences | index("istio-ca"))' <<<"$st" >/dev/null
}
c_token_review_wrong_audience() {
  local st
  st=$(token_review not-istio-ca | jq -c .status)
  echo "$st"
  jq -e '.authenticated != true' <<<"$st" >/dev/null
}
c_delete() {
  # Pods bound to a node never finish graceful deletion without a kubelet: force.
  k -n "$NS" delete pod "$POD" --grace-period=0 --force 2>&1 || return 1
  k delete ns "$NS" --wait=false || return 1
  # shellcheck disable=SC2016 # expanded by the inner bash
  retry 90 bash -c '! "$0" --kubeconfig "$1" get ns "$2" -o name 2>/dev/null' "$KUBECTL" "$KUBECONFIG" "$NS" || return 1
  k delete node "$NODE"
}

check "server version is $K8S_VERSION" c_version
check "get ns lists default and kube-system" c_default_namespaces
check "namespace $NS labelled istio.io/dataplane-mode=ambient" c_ambient_namespace
check "serviceaccount $NS/$SA" c_service_account
check "node $NODE" c_node
check "pod $NS/$POD with nodeName" c_pod
check "service $NS/echo gets a ClusterIP" c_service
check "pod /status patched to Running/Ready, podIP $POD_IP" c_pod_status
check "EndpointSlice (discovery.k8s.io/v1beta1) has $POD_IP ready=true" c_endpointslice
check "Endpoints has $POD_IP:8080" c_endpoints
check "controller-manager created $NS/default serviceaccount" c_kcm_default_sa
check "TokenRequest for $NS/$SA with audience istio-ca" c_token_request
check "TokenReview authenticates system:serviceaccount:$NS:$SA" c_token_review
check "TokenReview with another audience is rejected" c_token_review_wrong_audience
check "force-delete pod, delete namespace (namespace controller)" c_delete

rss() { awk '/^VmRSS:/ { printf "%d MB", $2 / 1024 }' "/proc/$1/status" 2>/dev/null || echo "?"; }
k8s_log "timings: build.sh ${build_s}s, up.sh ${up_s}s (apiserver /readyz after ${READY_SECONDS}s)"
k8s_log "rss: kube-apiserver $(rss "$APISERVER_PID"), etcd $(rss "$ETCD_PID")${KCM_PID:+, kube-controller-manager $(rss "$KCM_PID")}"
echo "k8s smoke: $pass passed, $fail failed"
[ "$fail" = 0 ] || { echo "k8s smoke: FAILED (logs above; MESH_K8S_KEEP_STATE=1 keeps $STATE)" >&2; exit 1; }
