"""The waypoint's W-series (performance.md §4.2 item 5, §4.3): our waypoint against nginx as
an HTTP proxy, in the same run, on the same four namespaces as the L-series.

    cli ── nodea ── nodeb ── srv
    load         proxy (core 1)  backend nginx (core 0)

SUTs:
  direct    the load talks plain HTTP/1.1 to the backend (a one-worker nginx answering
            `return 200` with a 1 KiB body)
  nginx     a one-worker nginx in nodeb terminating TLS 1.3 (ECDSA P-256, X25519,
            AES-128-GCM, no session cache or tickets) and proxying with upstream keep-alive
  waypoint  our waypoint in nodeb (one worker thread), reached as in ambient mode: the
            client pod's ztunnel captures the request to the Service VIP and carries it over
            HBONE (mTLS 1.3 + HTTP/2 CONNECT, one pooled tunnel) to the waypoint, which routes
            it to the backend (an out-of-mesh workload, so plaintext, kept alive)

The client side's TLS runs on the load core in both proxied SUTs (wrk's or http-rate's for
nginx, the client ztunnel's for the waypoint), so core 1 holds only the proxy under test and
"requests per proxy CPU-second" compares the two proxies' work per request directly.

Scenarios:
  W1  wrk -t1 -c16|64 --latency, HTTP/1.1 keep-alive, 1 KiB responses (saturation)
  W3  `mesh-bench http-rate`, open loop at 1000 and 10000 rps over 16 connections, latency
      from each request's due time: added p50/p99 over direct, and the proxy's vCPU and RSS
      per 1000 rps (Istio's waypoint metric: 0.25 vCPU and 60 MB per 1000 rps)
"""

import json
import os
import re

from benchlib import (
    CLI_IP, LOAD_CPU, NB_NA, PROXY_CPU, SRV_IP, Sut, capture_outbound, cpu_window,
    hbone_workload, log, median_range, proc_cpu, proc_mem, release_capture, sh, wait_http,
    wait_until)

TOOLS = ("nginx", "wrk", "curl", "openssl")

BACKEND_PORT, NGINX_TLS_PORT = 8080, 8443
VIP = "198.18.5.10"
HOST = "backend.bench.svc.cluster.local"
BODY = "x" * 1024
# wrk and nginx both stop a keep-alive connection after 1000 requests by default.
KEEPALIVE_REQUESTS = 100000000

WORKLOADS = "workloads:\n" + hbone_workload("cli", CLI_IP, "node-a") + f"""- uid: bench/backend
  name: backend
  namespace: bench
  serviceAccount: backend
  workloadIps: [{SRV_IP}]
  node: node-b
  services:
    bench/{HOST}: {{80: {BACKEND_PORT}}}
""" + hbone_workload("waypoint", NB_NA, "node-b") + f"""services:
- name: backend
  namespace: bench
  hostname: {HOST}
  vips: [/{VIP}]
  ports: {{80: {BACKEND_PORT}}}
  waypoint: {{destination: {{Address: /{NB_NA}}}, hboneMtlsPort: 15008}}
policies: []
"""

WAYPOINT_OBJECTS = f"""objects:
- apiVersion: v1
  kind: Service
  metadata: {{name: backend, namespace: bench, labels: {{istio.io/use-waypoint: waypoint}}}}
  spec: {{ports: [{{name: http, port: 80, targetPort: {BACKEND_PORT}}}]}}
"""


def nginx_conf(work, name, server):
    return f"""daemon off;
master_process off;
worker_processes 1;
pid {work}/{name}.pid;
error_log {work}/{name}.err warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {work}/{name}-tmp;
  proxy_temp_path {work}/{name}-tmp;
  fastcgi_temp_path {work}/{name}-tmp;
  uwsgi_temp_path {work}/{name}-tmp;
  scgi_temp_path {work}/{name}-tmp;
  keepalive_requests {KEEPALIVE_REQUESTS};
  keepalive_timeout 300s;
  default_type text/plain;
{server}
}}
"""


def backend_conf(work):
    return nginx_conf(work, "backend", f"""  server {{
    listen {SRV_IP}:{BACKEND_PORT} reuseport backlog=4096;
    location / {{ return 200 "{BODY}"; }}
  }}""")


def proxy_conf(work, tls):
    return nginx_conf(work, "proxy", f"""  upstream backend {{
    server {SRV_IP}:{BACKEND_PORT};
    keepalive 128;
    keepalive_requests {KEEPALIVE_REQUESTS};
  }}
  server {{
    listen {NB_NA}:{NGINX_TLS_PORT} ssl backlog=4096;
    ssl_certificate {tls / "server.pem"};
    ssl_certificate_key {tls / "server.key"};
    ssl_protocols TLSv1.3;
    ssl_ecdh_curve X25519;
    ssl_prefer_server_ciphers on;
    ssl_conf_command Ciphersuites TLS_AES_128_GCM_SHA256;
    ssl_session_cache off;
    ssl_session_tickets off;
    location / {{
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }}
  }}""")


def write_tls(work):
    """A throwaway P-256 root and a server certificate for nginx (SAN: the Service name)."""
    d = work / "nginx-tls"
    d.mkdir()
    ossl = ["openssl"]
    sh(*ossl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
       "-nodes", "-keyout", str(d / "root.key"), "-out", str(d / "root.pem"), "-days", "2",
       "-subj", "/CN=bench root", "-addext", "basicConstraints=critical,CA:TRUE",
       "-addext", "keyUsage=critical,keyCertSign")
    sh(*ossl, "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
       "-keyout", str(d / "server.key"), "-out", str(d / "server.csr"), "-subj", f"/CN={HOST}")
    (d / "ext").write_text(f"subjectAltName=DNS:{HOST},IP:{NB_NA}\n"
                           "basicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n")
    sh(*ossl, "x509", "-req", "-in", str(d / "server.csr"), "-CA", str(d / "root.pem"),
       "-CAkey", str(d / "root.key"), "-CAcreateserial", "-days", "2", "-extfile",
       str(d / "ext"), "-out", str(d / "server.pem"))
    return d


class Backend:
    """The app: a one-worker nginx in srv on the load core, shared by every W SUT."""

    def __init__(self, lab, work):
        self.lab, self.work, self.proc = lab, work, None

    def start(self):
        (self.work / "backend-tmp").mkdir(exist_ok=True)
        conf = self.work / "backend.conf"
        conf.write_text(backend_conf(self.work))
        self.proc = self.lab.spawn("srv", ["nginx", "-p", str(self.work), "-e",
                                           str(self.work / "backend.err"), "-c", str(conf)],
                                   cpu=LOAD_CPU)
        wait_http(self.lab, "cli", f"http://{SRV_IP}:{BACKEND_PORT}/", "backend nginx")

    def stop(self):
        if self.proc:
            self.lab.stop([self.proc])
            self.proc = None


class Direct(Sut):
    name = "direct"
    url = f"http://{SRV_IP}:{BACKEND_PORT}/"
    addr = f"{SRV_IP}:{BACKEND_PORT}"
    tls_root = None


class NginxProxy(Sut):
    name = "nginx"
    url = f"https://{NB_NA}:{NGINX_TLS_PORT}/"
    addr = f"{NB_NA}:{NGINX_TLS_PORT}"

    def __init__(self, lab, work, tls):
        super().__init__(lab, work)
        self.tls = tls
        self.tls_root = str(tls / "root.pem")

    def start(self):
        (self.work / "proxy-tmp").mkdir(exist_ok=True)
        conf = self.work / "proxy.conf"
        conf.write_text(proxy_conf(self.work, self.tls))
        self.procs.append(self.lab.spawn("nb", ["nginx", "-p", str(self.work), "-e",
                                                str(self.work / "proxy.err"), "-c", str(conf)],
                                         cpu=PROXY_CPU))
        wait_until(self.lab, "cli", [
            "curl", "-sf", "-o", "/dev/null", "--cacert", self.tls_root, "--resolve",
            f"{HOST}:{NGINX_TLS_PORT}:{NB_NA}", f"https://{HOST}:{NGINX_TLS_PORT}/"],
            "nginx proxy over TLS")


class Waypoint(Sut):
    """Our waypoint in nodeb, fed by our ztunnel (dedicated mode) capturing in cli."""
    name = "waypoint"
    url = f"http://{VIP}/"
    addr = f"{VIP}:80"
    tls_root = None

    def __init__(self, lab, work, ztunnel_bin, waypoint_bin, workers):
        super().__init__(lab, work)
        self.zt, self.wp, self.workers = ztunnel_bin, waypoint_bin, workers
        self.ztunnel = None

    def start(self):
        (self.work / "w-local.yaml").write_text(WORKLOADS)
        (self.work / "waypoint.yaml").write_text(
            "waypoint: {name: waypoint, namespace: bench}\n" + WORKLOADS + WAYPOINT_OBJECTS)
        env = dict(os.environ)
        env.update({"WAYPOINT_CONFIG": str(self.work / "waypoint.yaml"),
                    "LOCAL_CA_DIR": str(self.work / "ca"), "SERVICE_ACCOUNT": "waypoint",
                    "POD_NAMESPACE": "bench", "INSTANCE_IP": NB_NA,
                    "HBONE_ADDR": f"{NB_NA}:15008", "WORKER_THREADS": str(self.workers),
                    "RUST_LOG": "warn"})
        self.procs.append(self.lab.spawn("nb", [self.wp], cpu=PROXY_CPU, env=env))
        capture_outbound(self.lab, "cli")
        zenv = dict(os.environ)
        zenv.update({"PROXY_MODE": "dedicated", "LOCAL_XDS_PATH": str(self.work / "w-local.yaml"),
                     "NODE_NAME": "node-a", "RUST_LOG": "warn", "PACKET_MARK": "1337",
                     "WORKER_THREADS": "1", "LOCAL_CA_DIR": str(self.work / "ca")})
        # The client pod's ztunnel shares the load core: its TLS is the client's side.
        self.ztunnel = self.lab.spawn("cli", [self.zt], cpu=LOAD_CPU, env=zenv)
        wait_http(self.lab, "nb", "http://127.0.0.1:15021/healthz/ready", "waypoint")
        wait_http(self.lab, "cli", "http://127.0.0.1:15021/healthz/ready", "client ztunnel")
        wait_http(self.lab, "cli", self.url, "backend through the waypoint")

    def stop(self):
        if self.ztunnel:
            self.lab.stop([self.ztunnel])
            self.ztunnel = None
        super().stop()
        release_capture(self.lab, "cli")

    def helper_pids(self):
        return [self.ztunnel.pid] if self.ztunnel else []


_UNIT = {"us": 1.0, "ms": 1e3, "s": 1e6}


def _dur_us(s):
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", s)
    if not m:
        raise RuntimeError(f"wrk printed an unreadable latency {s!r}")
    return float(m.group(1)) * _UNIT[m.group(2)]


def parse_wrk(out):
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in ([\d.]+)(\w+), ([\d.]+)(\w+) read", out)
    if not rps or not total:
        raise RuntimeError(f"wrk printed no totals: {out[-400:]}")
    pct = {int(p): _dur_us(v) for p, v in re.findall(r"^\s+(\d+)%\s+(\S+)$", out, re.M)}
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"rps": float(rps.group(1)), "requests": int(total.group(1)),
            "read": f"{total.group(4)}{total.group(5)}",
            "p50_us": pct.get(50), "p99_us": pct.get(99),
            "socket_errors": sum(int(x) for x in sock.groups()) if sock else 0,
            "non_2xx": int(non2xx.group(1)) if non2xx else 0}


def proxy_costs(sut, fn):
    """Runs `fn` and charges the proxy's (and helper's) CPU and the system's to it."""
    helpers = sut.helper_pids()
    h0 = [proc_cpu(p) for p in helpers]
    out, sys_cpu, proxy_cpu, wall = cpu_window(sut, fn)
    helper_cpu = sum(proc_cpu(p) - a for p, a in zip(helpers, h0))
    rss = sum(proc_mem(p)[0] for p in sut.proxy_pids())
    return out, sys_cpu, proxy_cpu, helper_cpu, wall, rss


def w1(lab, sut, seconds, conns):
    args = ["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--latency", "-H", f"Host: {HOST}",
            sut.url]
    out, sys_cpu, proxy_cpu, helper_cpu, _, rss = proxy_costs(
        sut, lambda: lab.run("cli", args, cpu=LOAD_CPU, timeout=seconds + 30))
    m = parse_wrk(out)
    n = max(m["requests"], 1)
    m.update({"proxy_cpu_us_per_req": proxy_cpu / n * 1e6 if proxy_cpu else None,
              "helper_cpu_us_per_req": helper_cpu / n * 1e6 if helper_cpu else None,
              "sys_cpu_us_per_req": sys_cpu / n * 1e6,
              "proxy_rss_kb": rss or None})
    m["errors"] = m["socket_errors"] + m["non_2xx"] + (0 if m["requests"] else 1)
    return m


def w3(lab, sut, seconds, rate, tool):
    args = [tool, "http-rate", "--to", sut.addr, "--host", HOST, "--rate", str(rate),
            "--seconds", str(seconds), "--connections", "16", "--expect-bytes", str(len(BODY))]
    if sut.tls_root:
        args += ["--tls-root", sut.tls_root]
    out, sys_cpu, proxy_cpu, helper_cpu, wall, rss = proxy_costs(
        sut, lambda: lab.run("cli", args, cpu=LOAD_CPU, timeout=seconds + 30))
    m = json.loads(out)
    per_k = m["achieved_rps"] / 1000 if m["achieved_rps"] else None
    # CPU-seconds per 1000 requests = vCPU per 1000 rps (not divided by the window's wall
    # time, which also holds the tool's start, dials and handshakes).
    n = m["requests"]
    m.update({"proxy_vcpu_per_1000_rps": proxy_cpu / n * 1000 if n and proxy_cpu else None,
              "helper_vcpu_per_1000_rps": helper_cpu / n * 1000 if n and helper_cpu else None,
              "proxy_rss_mb": rss / 1024 if rss else None,
              "proxy_rss_mb_per_1000_rps": rss / 1024 / per_k if per_k and rss else None,
              "sys_vcpu": sys_cpu / wall,
              "rate_reached": m["achieved_rps"] >= 0.95 * rate})
    m["errors"] = m["errors"] + m["bad_responses"]
    return m


def suts(lab, work, ztunnel_bin, waypoint_bin, workers):
    return [Direct(lab, work), NginxProxy(lab, work, write_tls(work)),
            Waypoint(lab, work, ztunnel_bin, waypoint_bin, workers)]


def scenario_ids(kinds, quick):
    w1_conns = [16] if quick else [16, 64]
    w3_rates = [1000] if quick else [1000, 10000]
    ids = []
    if "W1" in kinds:
        ids += [(f"W1_c{c}", "W1", c) for c in w1_conns]
    if "W3" in kinds:
        ids += [(f"W3_{r}rps", "W3", r) for r in w3_rates]
    return ids


def run_all(lab, work, kinds, reps, seconds, quick, tool, ztunnel_bin, waypoint_bin, workers,
            errors):
    """Every W scenario for every SUT, `reps` interleaved repetitions after a warm-up."""
    backend = Backend(lab, work)
    backend.start()
    result = []
    try:
        systems = suts(lab, work, ztunnel_bin, waypoint_bin, workers)
        ids = scenario_ids(kinds, quick)

        def one(sut, kind, arg, t):
            if kind == "W1":
                return w1(lab, sut, t, arg)
            return w3(lab, sut, t, arg, tool)

        log(f"W warm-up: {', '.join(i for i, _, _ in ids)}")
        for sut in systems:
            try:
                sut.start()
                for _, kind, arg in ids:
                    one(sut, kind, arg, 1)
            finally:
                sut.stop()
        for rep in range(reps):
            order = systems[rep % len(systems):] + systems[:rep % len(systems)]
            log(f"W repetition {rep + 1}/{reps}: {' '.join(s.name for s in order)}")
            row = {}
            for sut in order:
                try:
                    sut.start()
                    # The process is new: one short untimed pass before the timed ones
                    # (not in --quick, which must stay under 3 minutes).
                    if not quick:
                        one(sut, ids[0][1], ids[0][2], 1)
                    for sid, kind, arg in ids:
                        m = one(sut, kind, arg, seconds)
                        row.setdefault(sid, {})[sut.name] = m
                        if m.get("errors") or m.get("rate_reached") is False:
                            errors.append(f"rep {rep} {sid} {sut.name}: {m}")
                finally:
                    sut.stop()
            result.append(row)
    finally:
        backend.stop()
    return result


def summarize(reps):
    """Per W scenario: the waypoint against nginx, and both against direct."""
    summary = {}
    ids = sorted({sid for r in reps for sid in r})
    for sid in ids:
        rows = [r[sid] for r in reps if sid in r and {"direct", "nginx", "waypoint"} <= set(r[sid])]
        if not rows:
            continue
        out = {}
        if sid.startswith("W1"):
            for s in ("nginx", "waypoint"):
                out[s] = {
                    "rps_vs_direct": median_range([r[s]["rps"] / r["direct"]["rps"] for r in rows]),
                    "proxy_cpu_us_per_req": median_range([r[s]["proxy_cpu_us_per_req"]
                                                          for r in rows]),
                    "added_p50_us": median_range([r[s]["p50_us"] - r["direct"]["p50_us"]
                                                  for r in rows]),
                    "added_p99_us": median_range([r[s]["p99_us"] - r["direct"]["p99_us"]
                                                  for r in rows]),
                }
            # rps per proxy core = 1 / CPU per request; the waypoint over nginx.
            out["waypoint"]["rps_per_core_vs_nginx"] = median_range([
                r["nginx"]["proxy_cpu_us_per_req"] / r["waypoint"]["proxy_cpu_us_per_req"]
                for r in rows if r["waypoint"]["proxy_cpu_us_per_req"]])
        else:
            for s in ("nginx", "waypoint"):
                out[s] = {
                    "added_p50_us": median_range([r[s]["p50_us"] - r["direct"]["p50_us"]
                                                  for r in rows]),
                    "added_p99_us": median_range([r[s]["p99_us"] - r["direct"]["p99_us"]
                                                  for r in rows]),
                    "proxy_vcpu_per_1000_rps": median_range([r[s]["proxy_vcpu_per_1000_rps"]
                                                             for r in rows]),
                    "proxy_rss_mb": median_range([r[s]["proxy_rss_mb"] for r in rows]),
                    "rate_reached": all(r[s]["rate_reached"] for r in rows),
                }
            out["waypoint"]["added_p99_vs_nginx"] = median_range([
                (r["waypoint"]["p99_us"] - r["direct"]["p99_us"]) /
                (r["nginx"]["p99_us"] - r["direct"]["p99_us"])
                for r in rows if r["nginx"]["p99_us"] > r["direct"]["p99_us"]])
            out["waypoint"]["ztunnel_vcpu_per_1000_rps"] = median_range([
                r["waypoint"]["helper_vcpu_per_1000_rps"] for r in rows])
        summary[sid] = out
    return summary
