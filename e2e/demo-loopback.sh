#!/usr/bin/env bash
# Two-node mesh on loopback: ztunnel A (node-a) serves a "sleep" client at 127.0.77.2,
# ztunnel B (node-b) serves an "echo" server at 127.0.77.3 behind the service VIP
# 127.0.77.100:80. The client reaches the service through A's SOCKS5 entry; A and B carry it
# over HBONE (mTLS + HTTP/2 CONNECT). Then a DENY policy is applied and the same call is
# refused, with the policy named in B's access log. Everything is stopped on exit.
#
#   bash e2e/demo-loopback.sh          # run the demo and tear down
#   KEEP=1 bash e2e/demo-loopback.sh   # leave it running until Ctrl-C
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=${BIN:-target/debug}
WORK=$(mktemp -d /tmp/mesh-demo.XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

[ -x "$BIN/ztunnel" ] && [ -x "$BIN/meshctl" ] || cargo build --locked -p ztunnel -p meshctl

say "CA for trust domain cluster.local"
"$BIN/meshctl" ca create "$WORK/ca"

# The echo app (node-b's workload).
python3 - "$WORK/echo.port" <<'PY' &
import socket, sys, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.77.3", 0)); s.listen(64)
open(sys.argv[1], "w").write(str(s.getsockname()[1]))
def serve(c):
    data = b""
    while True:
        b = c.recv(65536)
        if not b: break
        data += b
    c.sendall(b"echo from 127.0.77.3: " + data); c.close()
while True:
    c, _ = s.accept(); threading.Thread(target=serve, args=(c,), daemon=True).start()
PY
PIDS+=($!)
for _ in $(seq 50); do [ -s "$WORK/echo.port" ] && break; sleep 0.1; done
APP_PORT=$(cat "$WORK/echo.port")

write_config() { # $1 = file, $2 = policies YAML
  cat > "$1" <<YAML
workloads:
- uid: bar/sleep
  name: sleep
  namespace: bar
  serviceAccount: sleep
  workloadIps: [127.0.77.2]
  protocol: HBONE
  node: node-a
- uid: foo/echo
  name: echo
  namespace: foo
  serviceAccount: echo
  workloadIps: [127.0.77.3]
  protocol: HBONE
  node: node-b
  services:
    foo/echo.foo.svc.cluster.local: {80: $APP_PORT}
services:
- name: echo
  namespace: foo
  hostname: echo.foo.svc.cluster.local
  vips: [/127.0.77.100]
  ports: {80: $APP_PORT}
policies: $2
YAML
}
write_config "$WORK/mesh.yaml" "[]"

start_ztunnel() { # $1 = node, $2 = ip
  "$BIN/ztunnel" --local-xds-path "$WORK/mesh.yaml" --local-ca-dir "$WORK/ca" \
    --node-name "$1" --packet-mark 0 \
    --inbound-addr "$2:15008" --outbound-addr "$2:15001" --inbound-plaintext-addr "$2:15006" \
    --socks5-addr "$2:15080" --admin-addr "$2:15000" --stats-addr "$2:15020" \
    --readiness-addr "$2:15021" --log-format plain >"$WORK/$1.log" 2>&1 &
  PIDS+=($!)
}
say "Starting ztunnel on node-a (127.0.77.2) and node-b (127.0.77.3)"
start_ztunnel node-a 127.0.77.2
start_ztunnel node-b 127.0.77.3
for ip in 127.0.77.2 127.0.77.3; do
  for _ in $(seq 100); do
    python3 -c "import urllib.request,sys; urllib.request.urlopen('http://$ip:15021/healthz/ready')" 2>/dev/null && break
    sleep 0.1
  done
  echo "ztunnel $ip: ready"
done

call() { # SOCKS5 CONNECT from the client's IP to the service VIP, send a line, print reply
  python3 - <<'PY'
import socket, struct
s = socket.socket(); s.bind(("127.0.77.2", 0)); s.settimeout(5)
s.connect(("127.0.77.2", 15080))
s.sendall(b"\x05\x01\x00"); assert s.recv(2) == b"\x05\x00"
s.sendall(b"\x05\x01\x00\x01" + socket.inet_aton("127.0.77.100") + struct.pack(">H", 80))
rep = s.recv(10)
if rep[1] != 0:
    print("  refused: SOCKS5 reply %d (%s)" % (rep[1], {2: "not allowed by policy", 5: "connection refused"}.get(rep[1], "error")))
    raise SystemExit(0)
s.sendall(b"hello through the mesh\n"); s.shutdown(socket.SHUT_WR)
out = b""
try:
    while True:
        b = s.recv(65536)
        if not b: break
        out += b
except Exception as e:
    pass
print("  reply:", out.decode().strip() if out else "(connection closed, nothing received)")
PY
}

say "sleep -> echo.foo (VIP 127.0.77.100:80)"
call
sleep 0.3
say "Access log (one line per connection, both SPIFFE identities)"
grep -h 'access' "$WORK/node-a.log" "$WORK/node-b.log" | sed 's/^/  /'

say "Applying AuthorizationPolicy foo/deny-sleep (DENY principal cluster.local/ns/bar/sa/sleep)"
write_config "$WORK/mesh.yaml.new" '
- name: deny-sleep
  namespace: foo
  scope: Namespace
  action: Deny
  rules: [[[{principals: [{Exact: cluster.local/ns/bar/sa/sleep}]}]]]'
sleep 1.1; mv "$WORK/mesh.yaml.new" "$WORK/mesh.yaml"
for _ in $(seq 50); do
  [ "$(grep -c 'configuration reloaded' "$WORK/node-b.log")" -ge 1 ] && break; sleep 0.1
done
call
sleep 0.3
say "node-b's access log for the denied connection"
grep -h 'denied' "$WORK/node-b.log" | sed 's/^/  /'

say "Metrics on node-b (istio_tcp_connections_opened_total)"
python3 -c "import urllib.request; print(urllib.request.urlopen('http://127.0.77.3:15020/metrics').read().decode())" \
  | grep '^istio_tcp_connections_opened_total' | sed 's/^/  /'

if [ "${KEEP:-0}" = 1 ]; then
  say "Running. Try: $BIN/meshctl ztunnel config-dump --admin 127.0.77.2:15000   (Ctrl-C to stop)"
  wait
fi
say "Done; tearing down"
