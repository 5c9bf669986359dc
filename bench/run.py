#!/usr/bin/env python3
"""The mesh's benchmark harness: every system under test side by side in one run, on one
network-namespace topology, with interleaved repetitions, reported as ratios.

Method: shared/reference/performance.md §4 (topology §4.2, scenarios §4.3, goals §5).

    cli ── nodea ── nodeb ── srv          (four netns, three veth pairs, 198.18.0.0/15)

Systems under test (SUTs):
  nomesh   routing only
  ruler    a plaintext `socat -b 262144` relay in nodea and in nodeb, chained
  ours     our ztunnel in dedicated mode: one in cli (iptables REDIRECT of its egress to
           :15001) and one in srv (HBONE in on :15008), local config + local CA
  ours_shared  our ztunnel in shared mode, one per node netns, with the node agent
           (mesh-cni-agent) putting the in-pod rules into cli and srv and handing their
           netns over ZDS (shared.py); same config and CA
  external any other ztunnel binary given with --external (e.g. Istio's), fed the same
           local config file (Istio's LOCAL_XDS_PATH format) with FAKE_CA=true
  ours_unpooled  ours with POOL_UNUSED_RELEASE_TIMEOUT=0s and POOL_MAX_STREAMS_PER_CONNECTION=1
           (Istio's knobs): every connection does its own mTLS handshake; runs only L6

Scenarios: L1 iperf3 1 stream (fwd and reverse), L2 iperf3 -P 4, L3 sockperf ping-pong
64 B, L5 new connections/s over the pooled tunnel, L6 new connections/s with a new mTLS
tunnel each (nomesh, ruler, ours_unpooled), L7 idle memory per proxied connection.
W1 and W3 compare our waypoint with nginx as HTTP proxies (their own SUTs: wseries.py).

Safety: the namespaces are created with unique names, have no route to any real
interface, and everything this script starts is killed by PID and every namespace it made
is deleted by name on exit (also on Ctrl-C and on errors).
"""

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import (  # noqa: E402
    CLI_IP, LOAD_CPU, NA_CLI, NB_NA, PORT_ECHO, PORT_IPERF, PORT_SOCKPERF, PROXY_CPU, ROOT,
    SRV_IP, Lab, Sut, capture_outbound, hbone_workload, cpu_window, log, median_range, proc_mem,
    proc_rss_anon,
    release_capture, sh, wait_http)
import shared  # noqa: E402
import wseries  # noqa: E402


class NoMesh(Sut):
    name = "nomesh"


class Ruler(Sut):
    name = "ruler"
    target = NA_CLI

    def start(self):
        for port in (PORT_IPERF, PORT_SOCKPERF, PORT_ECHO):
            self.procs.append(self.lab.spawn("na", [
                "socat", "-b", "262144", f"TCP-LISTEN:{port},bind={NA_CLI},fork,reuseaddr",
                f"TCP:{NB_NA}:{port},nodelay"], cpu=PROXY_CPU))
            self.procs.append(self.lab.spawn("nb", [
                "socat", "-b", "262144", f"TCP-LISTEN:{port},bind={NB_NA},fork,reuseaddr",
                f"TCP:{SRV_IP}:{port},nodelay"], cpu=PROXY_CPU))
        time.sleep(0.3)

    def proxy_pids(self):
        # socat forks a child per connection; the parents' cutime/cstime count the children
        # once they are reaped (proc_cpu), so the parents are enough.
        return [p.pid for p in self.procs]


LOCAL_CONFIG = ("workloads:\n" + hbone_workload("cli", CLI_IP, "node-a")
                + hbone_workload("srv", SRV_IP, "node-b") + "policies: []\nservices: []\n")


class Ztunnel(Sut):
    """A ztunnel pair in dedicated mode: client side in cli, server side in srv."""

    def __init__(self, lab, work, binary, name, workers, external=False, extra_env=None,
                 only=None):
        super().__init__(lab, work)
        self.binary, self.name, self.workers, self.external = binary, name, workers, external
        self.extra_env = extra_env or {}
        # Scenarios this SUT runs (None: all but L6, which needs the pool off).
        self.only = only

    def env(self, node):
        e = dict(os.environ)
        e.update({
            "PROXY_MODE": "dedicated", "LOCAL_XDS_PATH": str(self.work / "local.yaml"),
            "NODE_NAME": node, "RUST_LOG": "warn", "PACKET_MARK": "1337",
            "WORKER_THREADS": str(self.workers), "ZTUNNEL_WORKER_THREADS": str(self.workers),
        })
        if self.external:
            e.update({"FAKE_CA": "true", "XDS_ADDRESS": "", "CA_ADDRESS": "",
                      "ENABLE_ORIG_SRC": "false"})
        else:
            e.update({"LOCAL_CA_DIR": str(self.work / "ca")})
        e.update(self.extra_env)
        return e

    def start(self):
        capture_outbound(self.lab, "cli")
        self.procs.append(self.lab.spawn("cli", [self.binary], cpu=PROXY_CPU,
                                         env=self.env("node-a")))
        self.procs.append(self.lab.spawn("srv", [self.binary], cpu=PROXY_CPU,
                                         env=self.env("node-b")))
        for ns in ("cli", "srv"):
            wait_http(self.lab, ns, "http://127.0.0.1:15021/healthz/ready", f"{self.name} in {ns}")

    def stop(self):
        super().stop()
        release_capture(self.lab, "cli")

    def admin_namespaces(self):
        return [] if self.external else ["cli", "srv"]


# ---------- scenarios: each returns a dict of metrics for one SUT run ----------

def iperf(lab, sut, seconds, streams=1, reverse=False, omit=2):
    srv = lab.spawn("srv", ["iperf3", "-s", "-1", "-p", str(PORT_IPERF)], cpu=LOAD_CPU)
    time.sleep(0.3)
    args = ["iperf3", "-c", sut.target, "-p", str(PORT_IPERF), "-t", str(seconds), "-O", str(omit),
            "-J", "-P", str(streams)] + (["-R"] if reverse else [])
    try:
        out, sys_cpu, proxy_cpu, _ = cpu_window(sut, lambda: lab.run("cli", args, cpu=LOAD_CPU,
                                                                      timeout=seconds + 30))
    finally:
        lab.stop([srv])
    j = json.loads(out)
    recv = j["end"]["sum_received"]
    gbytes = recv["bytes"] / 1e9
    return {"gbit_s": recv["bits_per_second"] / 1e9, "bytes": recv["bytes"],
            "sent_bytes": j["end"].get("sum_sent", {}).get("bytes"),
            "retransmits": j["end"].get("sum_sent", {}).get("retransmits", 0),
            "sys_cpu_s_per_gb": sys_cpu / gbytes if gbytes else None,
            "proxy_cpu_s_per_gb": proxy_cpu / gbytes if gbytes else None}


def sockperf(lab, sut, seconds):
    srv = lab.spawn("srv", ["sockperf", "server", "--tcp", "-i", SRV_IP, "-p",
                            str(PORT_SOCKPERF)], cpu=LOAD_CPU)
    time.sleep(0.5)
    try:
        out = lab.run("cli", ["sockperf", "ping-pong", "--tcp", "-i", sut.target, "-p",
                              str(PORT_SOCKPERF), "-m", "64", "-t", str(seconds), "--full-rtt"],
                      cpu=LOAD_CPU, timeout=seconds + 30)
    finally:
        lab.stop([srv])
    pct = {}
    for m in re.finditer(r"percentile\s+([\d.]+)\s*=\s*([\d.]+)", out):
        pct[float(m.group(1))] = float(m.group(2))
    if 50.0 not in pct:
        raise RuntimeError(f"sockperf printed no percentiles: {out[-400:]}")
    return {"p50_us": pct.get(50.0), "p99_us": pct.get(99.0), "p999_us": pct.get(99.9)}


def connrate(lab, sut, seconds, tool):
    srv = lab.spawn("srv", [tool, "server", "--listen", f"{SRV_IP}:{PORT_ECHO}"], cpu=LOAD_CPU)
    time.sleep(0.3)
    try:
        out, sys_cpu, proxy_cpu, _ = cpu_window(sut, lambda: lab.run(
            "cli", [tool, "connrate", "--to", f"{sut.target}:{PORT_ECHO}", "--seconds",
                    str(seconds), "--concurrency", "4"], cpu=LOAD_CPU, timeout=seconds + 30))
    finally:
        lab.stop([srv])
    j = json.loads(out)
    n = max(j["connections"], 1)
    return {"conn_per_s": j["per_second"], "errors": j["errors"], "p50_us": j["p50_us"],
            "p99_us": j["p99_us"], "proxy_cpu_us_per_conn": proxy_cpu / n * 1e6,
            "sys_cpu_us_per_conn": sys_cpu / n * 1e6}


L7_WARM = 100  # connections opened and closed before the baseline is read


def hold(lab, sut, count, tool, work, at_peak):
    """Opens `count` idle connections through `sut`, calls `at_peak()` while they are all
    open, closes them; returns the holder's report."""
    ready = work / f"hold-{sut.name}-{count}"
    ready.unlink(missing_ok=True)
    holder = lab.spawn("cli", [tool, "hold", "--to", f"{sut.target}:{PORT_ECHO}", "--count",
                               str(count), "--ready-file", str(ready), "--seconds", "600"],
                       cpu=LOAD_CPU, stdout=subprocess.PIPE)
    deadline = time.time() + 120
    while not ready.exists():
        if time.time() > deadline or holder.poll() is not None:
            lab.stop([holder])
            raise RuntimeError(f"holder for {sut.name} did not open {count} connections")
        time.sleep(0.1)
    at_peak()
    ready.unlink()
    out, _ = holder.communicate(timeout=60)
    lab.procs.remove(holder)
    return json.loads(out)


def idle_memory(lab, sut, count, settle, tool, work):
    srv = lab.spawn("srv", [tool, "server", "--listen", f"{SRV_IP}:{PORT_ECHO}"], cpu=LOAD_CPU)
    try:
        time.sleep(0.3)
        pids = sut.proxy_pids()
        # The baseline is a proxy that has served a few connections (code paged in, one
        # warm tunnel, lazily built state), not one that never saw traffic.
        hold(lab, sut, L7_WARM, tool, work, lambda: None)
        time.sleep(2.0)
        before = [proc_mem(p) for p in pids]
        before_anon = [proc_rss_anon(p) for p in pids]
        heap = {"before": sut.allocator_stats()}
        peak, peak_anon = [], []

        def at_peak():
            time.sleep(1.0)
            peak.extend(proc_mem(p) for p in pids)
            peak_anon.extend(proc_rss_anon(p) for p in pids)
            heap["peak"] = sut.allocator_stats()

        held = hold(lab, sut, count, tool, work, at_peak)
        time.sleep(settle)
        after = [proc_mem(p) for p in pids]
        after_anon = [proc_rss_anon(p) for p in pids]
        heap["after"] = sut.allocator_stats()
    finally:
        lab.stop([srv])

    def pct(a, b):
        return round(100 * (a - b) / b, 1) if b else None
    per = [((pk[0] - b[0]) * 1024 / count, (pk[1] - b[1]) * 1024 / count)
           for b, pk in zip(before, peak)]
    return {"opened": held["opened"], "failed": held["failed"], "warm_connections": L7_WARM,
            "rss_kb": {"before": [b[0] for b in before], "peak": [p[0] for p in peak],
                       "after": [a[0] for a in after]},
            "rss_anon_kb": {"before": before_anon, "peak": peak_anon, "after": after_anon},
            "bytes_per_conn_rss": [round(p[0]) for p in per],
            "bytes_per_conn_pss": [round(p[1]) for p in per],
            "retained_kb_after": [a[0] - b[0] for a, b in zip(after, before)],
            "retained_pct_after": [pct(a[0], b[0]) for a, b in zip(after, before)],
            "retained_anon_pct_after": [pct(a, b) for a, b in zip(after_anon, before_anon)],
            "allocator": heap}


# ---------- orchestration ----------

def versions():
    def first(cmd):
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
            return (r.stdout or r.stderr).strip().splitlines()[0]
        except Exception as e:  # noqa: BLE001 - a missing tool is recorded, not fatal
            return f"unavailable: {e}"
    cpu = "unknown"
    flags = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name") and cpu == "unknown":
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = line
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain"],
                           capture_output=True, text=True).stdout.strip() != ""
    return {"cpu": cpu, "cores": os.cpu_count(), "vaes": " vaes" in flags,
            "avx512f": " avx512f" in flags, "kernel": platform.release(),
            "commit": commit + ("-dirty" if dirty else ""),
            "iperf3": first(["iperf3", "--version"]), "sockperf": first(["sockperf", "--version"]),
            "socat": first(["socat", "-V"]), "rustc": first(["rustc", "--version"]),
            "nginx": first(["nginx", "-v"]), "wrk": first(["wrk", "-v"])}


def summarize(reps, suts):
    """Per scenario: per-rep ratios of ours (and external) against ruler and nomesh."""
    summary = {}
    mesh = [s for s in suts if s not in ("nomesh", "ruler")]

    def per_rep(scn, fn):
        out = {}
        for s in mesh:
            vals = []
            for r in reps:
                row = r.get(scn, {})
                if s in row and "nomesh" in row and "ruler" in row:
                    vals.append(fn(row[s], row["ruler"], row["nomesh"]))
            out[s] = vals
        return out

    def tput(scn):
        vs_r = per_rep(scn, lambda o, r, n: o["gbit_s"] / r["gbit_s"])
        vs_n = per_rep(scn, lambda o, r, n: o["gbit_s"] / n["gbit_s"])
        def overhead(o, r, n):
            c = [x["sys_cpu_s_per_gb"] for x in (o, r, n)]
            if None in c or c[1] - c[2] <= 0:
                return None
            return (c[0] - c[2]) / (c[1] - c[2])
        over = per_rep(scn, overhead)
        return {s: {"vs_ruler": median_range(vs_r[s]), "vs_nomesh": median_range(vs_n[s]),
                    "cpu_overhead_vs_ruler": median_range(over[s])} for s in mesh}

    for scn in ("L1", "L1R", "L2"):
        if any(scn in r for r in reps):
            summary[scn] = tput(scn)
    if any("L3" in r for r in reps):
        added = per_rep("L3", lambda o, r, n: (o["p50_us"] - n["p50_us"]) /
                        (r["p50_us"] - n["p50_us"]) if r["p50_us"] > n["p50_us"] else None)
        added99 = per_rep("L3", lambda o, r, n: o["p99_us"] - n["p99_us"])
        summary["L3"] = {s: {"added_p50_vs_ruler_added": median_range(added[s]),
                             "added_p99_us": median_range(added99[s])} for s in mesh}
    if any("L5" in r for r in reps):
        vs_r = per_rep("L5", lambda o, r, n: o["conn_per_s"] / r["conn_per_s"])
        vs_n = per_rep("L5", lambda o, r, n: o["conn_per_s"] / n["conn_per_s"])
        summary["L5"] = {s: {"vs_ruler": median_range(vs_r[s]),
                             "vs_nomesh": median_range(vs_n[s])} for s in mesh}
    if any("L6" in r for r in reps):
        vs_r = per_rep("L6", lambda o, r, n: o["conn_per_s"] / r["conn_per_s"])
        vs_n = per_rep("L6", lambda o, r, n: o["conn_per_s"] / n["conn_per_s"])
        # Both proxies' CPU per connection: one client and one server handshake each.
        cpu = per_rep("L6", lambda o, r, n: o["proxy_cpu_us_per_conn"])
        summary["L6"] = {s: {"vs_ruler": median_range(vs_r[s]),
                             "vs_nomesh": median_range(vs_n[s]),
                             "proxy_cpu_us_per_handshake_pair": median_range(cpu[s])}
                         for s in mesh if vs_n[s]}
    # A SUT that did not run a scenario (ours_unpooled runs only L6) has no row there.
    return {scn: {s: m for s, m in by_sut.items() if any(v is not None for v in m.values())}
            for scn, by_sut in summary.items()}


def flat_summary(summary):
    """The issue's shape: {"L1": {"ours_vs_ruler": x, "ours_vs_nomesh": y}, ...}."""
    out = {}
    for scn, by_sut in summary.items():
        row = {}
        for sut, metrics in by_sut.items():
            for k, v in metrics.items():
                if isinstance(v, dict) and v and "median" in v:
                    row[f"{sut}_{k}"] = v["median"]
                elif not isinstance(v, dict):
                    row[f"{sut}_{k}"] = v
        out[scn] = row
    return out


def markdown(result):
    lines = [f"# Benchmark {result['started']}", "",
             f"commit `{result['machine']['commit']}` · {result['machine']['cpu']} · "
             f"{result['machine']['cores']} cores · kernel {result['machine']['kernel']}", "",
             "| scenario | metric | median | min | max | n |", "|---|---|---|---|---|---|"]
    for scn, by_sut in result["summary_detail"].items():
        for sut, metrics in by_sut.items():
            for k, v in metrics.items():
                if isinstance(v, dict) and v and "median" in v:
                    lines.append(f"| {scn} | {sut} {k} | {v['median']} | {v['min']} | "
                                 f"{v['max']} | {v['n']} |")
    if result.get("L7"):
        lines += ["", "| L7 idle connections | SUT | bytes/conn RSS (client, server) | "
                  "retained after close: RSS % | anonymous RSS % |", "|---|---|---|---|---|"]
        for count, by_sut in result["L7"].items():
            for sut, m in by_sut.items():
                lines.append(f"| {count} | {sut} | {m['bytes_per_conn_rss']} | "
                             f"{m['retained_pct_after']} | "
                             f"{m.get('retained_anon_pct_after')} |")
    lines += ["", "## Honesty checklist", ""] + [f"- {c}" for c in result["checklist"]]
    return "\n".join(lines) + "\n"


ALL_SCENARIOS = "L1,L1R,L2,L3,L5,L6,L7,W1,W3"
# bench-quick must stay under 3 minutes on these 2-core machines.
QUICK_SCENARIOS = "L1,L3,L5,L7,W1,W3"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer, shorter repetitions (<3 min)")
    ap.add_argument("--reps", type=int)
    ap.add_argument("--scenarios", help="comma-separated (default: all; with --quick: "
                    f"{QUICK_SCENARIOS}); W1 and W3 are the waypoint against nginx")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--external", help="path of another ztunnel binary to compare (e.g. Istio's)")
    ap.add_argument("--candidate", help="path of another build of our ztunnel, run as `candidate` "
                    "with ours' configuration in the same reps (an A/B of a change)")
    ap.add_argument("--no-shared", action="store_true",
                    help="leave out ours_shared (ztunnel in shared mode, pods handed over ZDS)")
    ap.add_argument("--shared", action="store_true", help="run ours_shared also with --quick")
    ap.add_argument("--l7-counts", help="comma-separated idle connection counts for L7 "
                    "(default: 1000,10000; with --quick: 1000)")
    ap.add_argument("--l7-settle", type=float, help="seconds after the L7 burst closes before "
                    "the memory is read again (default: 60; with --quick: 5)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench: needs root (network namespaces, iptables)")
    chosen = a.scenarios or (QUICK_SCENARIOS if a.quick else ALL_SCENARIOS)
    scenarios = [s.strip() for s in chosen.split(",") if s.strip()]
    w_kinds = {s for s in scenarios if s in ("W1", "W3")}
    needed = ("iperf3", "sockperf", "socat", "iptables", "taskset") + (
        wseries.TOOLS if w_kinds else ())
    for tool in needed:
        if not shutil.which(tool):
            sys.exit(f"bench: {tool} is missing (make bench-deps installs the tools)")
    quick = a.quick
    reps = a.reps or (3 if quick else 5)
    t_bulk = 2 if quick else 10
    omit = 1 if quick else 2
    t_lat = 2 if quick else 10
    t_conn = 1 if quick else 5
    l7_counts = ([int(c) for c in a.l7_counts.split(",")] if a.l7_counts
                 else [1000] if quick else [1000, 10000])
    l7_settle = a.l7_settle if a.l7_settle is not None else 5 if quick else 60
    t_http = 2 if quick else 5
    release = ROOT / "target" / "release"
    zt, tool, meshctl = release / "ztunnel", release / "mesh-bench", release / "meshctl"
    wp, agent = release / "waypoint", release / "mesh-cni-agent"
    # --quick leaves ours_shared out unless asked for (with it, quick took 3 min 20 s).
    with_shared = (a.shared or not (a.no_shared or a.quick)) and bool(set(scenarios) - {"W1", "W3"})
    for b in (zt, tool, meshctl) + ((wp,) if w_kinds else ()) + ((agent,) if with_shared else ()):
        if not b.exists():
            sys.exit(f"bench: {b} missing; run `cargo build --release -p ztunnel -p mesh-bench "
                     "-p meshctl -p waypoint -p cni-plugin` (make bench does)")

    work = Path(tempfile.mkdtemp(prefix="mesh-bench-"))
    (work / "local.yaml").write_text(LOCAL_CONFIG)
    sh(str(meshctl), "ca", "create", str(work / "ca"))
    lab = Lab()
    started = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    result = {"started": started, "machine": versions(),
              "settings": {"quick": quick, "reps": reps, "bulk_s": t_bulk, "iperf_omit_s": omit,
                           "latency_s": t_lat, "connrate_s": t_conn, "http_s": t_http,
                           "l7_counts": l7_counts, "l7_settle_s": l7_settle,
                           "workers": a.workers, "pinning": f"load cpu {LOAD_CPU}, proxies cpu "
                           f"{PROXY_CPU}", "cipher": "rustls default order (AES-128-GCM first)",
                           "kx": "X25519", "certs": "ECDSA P-256 from a local root",
                           "log_level": "warn",
                           "allocator": "jemalloc (ztunnel's global allocator)"},
              "reps": [], "L7": {}, "W": [], "errors": []}

    def stop_all(*_):
        # Unwinds through the `finally` below, which kills by PID and deletes by name.
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, stop_all)
    signal.signal(signal.SIGTERM, stop_all)
    try:
        lab.create()
        unpooled = {"POOL_UNUSED_RELEASE_TIMEOUT": "0s", "POOL_MAX_STREAMS_PER_CONNECTION": "1"}
        suts = [NoMesh(lab, work), Ruler(lab, work),
                Ztunnel(lab, work, str(zt), "ours", a.workers)]
        if with_shared:
            suts.append(shared.ZtunnelShared(lab, work, str(zt), str(agent), a.workers))
        if a.candidate:
            suts.append(Ztunnel(lab, work, a.candidate, "candidate", a.workers))
        if a.external:
            suts.append(Ztunnel(lab, work, a.external, "external", a.workers, external=True))
        if "L6" in scenarios:
            suts.append(Ztunnel(lab, work, str(zt), "ours_unpooled", a.workers,
                                extra_env=unpooled, only={"L6"}))
            if a.external:
                suts.append(Ztunnel(lab, work, a.external, "external_unpooled", a.workers,
                                    external=True, extra_env=unpooled, only={"L6"}))
        names = [s.name for s in suts]

        def runs(sut, scn):
            only = getattr(sut, "only", None)
            if only is not None:
                return scn in only
            # A pooled mesh SUT would measure L5 again under L6's name.
            return not (scn == "L6" and isinstance(sut, (Ztunnel, shared.ZtunnelShared)))

        def one(scn, sut, short=False):
            t = 1 if short else None
            if scn == "L1":
                return iperf(lab, sut, t or t_bulk, omit=omit)
            if scn == "L1R":
                return iperf(lab, sut, t or t_bulk, reverse=True, omit=omit)
            if scn == "L2":
                return iperf(lab, sut, t or t_bulk, streams=4, omit=omit)
            if scn == "L3":
                return sockperf(lab, sut, t or t_lat)
            if scn in ("L5", "L6"):
                return connrate(lab, sut, t or t_conn, str(tool))
            raise ValueError(scn)

        timed = [s for s in scenarios if s not in ("L7", "W1", "W3")]
        if timed:
            log(f"warm-up: one short untimed pass per SUT and scenario ({', '.join(timed)})")
        for sut in suts if timed else []:
            if not any(runs(sut, scn) for scn in timed):
                continue
            try:
                sut.start()
                for scn in timed:
                    if runs(sut, scn):
                        one(scn, sut, short=True)
            finally:
                sut.stop()
        for rep in range(reps if timed else 0):
            order = suts[rep % len(suts):] + suts[:rep % len(suts)]
            row = {}
            log(f"repetition {rep + 1}/{reps}: {' '.join(s.name for s in order)}")
            for sut in order:
                if not any(runs(sut, scn) for scn in timed):
                    continue
                try:
                    sut.start()
                    # The process is new: one short untimed pass before the timed ones
                    # (not in --quick, which must stay under 3 minutes).
                    if not quick:
                        one(next(scn for scn in timed if runs(sut, scn)), sut, short=True)
                    for scn in timed:
                        if not runs(sut, scn):
                            continue
                        m = one(scn, sut)
                        row.setdefault(scn, {})[sut.name] = m
                        if m.get("errors") or m.get("bytes", 1) == 0:
                            result["errors"].append(f"rep {rep} {scn} {sut.name}: {m}")
                finally:
                    sut.stop()
            result["reps"].append(row)
        if "L7" in scenarios:
            for count in l7_counts:
                for sut in suts:
                    if sut.name in ("nomesh", "ruler") or not runs(sut, "L7"):
                        continue  # no long-lived proxy process to measure
                    try:
                        sut.start()
                        log(f"L7: {count} idle connections through {sut.name}")
                        m = idle_memory(lab, sut, count, l7_settle, str(tool), work)
                        result["L7"].setdefault(str(count), {})[sut.name] = m
                        if m["failed"]:
                            result["errors"].append(f"L7 {count} {sut.name}: {m['failed']} failed")
                    finally:
                        sut.stop()
        if w_kinds:
            result["W"] = wseries.run_all(lab, work, w_kinds, 2 if quick else reps, t_http,
                                          quick, str(tool), str(zt), str(wp), a.workers,
                                          result["errors"])
    finally:
        lab.destroy()
        shutil.rmtree(work, ignore_errors=True)

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    # The raw repetitions first, so that nothing measured is lost if summarizing fails.
    (out / f"{started}.json").write_text(json.dumps(result, indent=2) + "\n")
    detail = summarize(result["reps"], names)
    detail.update(wseries.summarize(result["W"]))
    result["summary_detail"] = detail
    result["summary"] = flat_summary(detail)
    for count, by_sut in result["L7"].items():
        for sut, m in by_sut.items():
            result["summary"].setdefault("L7", {})[f"{sut}_{count}_bytes_per_conn"] = max(
                m["bytes_per_conn_rss"], default=None)
            result["summary"]["L7"][f"{sut}_{count}_retained_pct"] = max(
                (x for x in m["retained_pct_after"] if x is not None), default=None)
            result["summary"]["L7"][f"{sut}_{count}_retained_anon_pct"] = max(
                (x for x in m["retained_anon_pct_after"] if x is not None), default=None)
    spreads = [v["max"] / v["min"] - 1 for r in [detail.get("L1", {})]
               for s in r.values() for v in [s.get("vs_nomesh")] if v and v["min"]]
    # performance.md §4.1: a no-mesh spread over 10% makes the run unstable (repeat it).
    nomesh = [r["L1"]["nomesh"]["gbit_s"] for r in result["reps"] if "nomesh" in r.get("L1", {})]
    nomesh_spread = max(nomesh) / min(nomesh) - 1 if nomesh and min(nomesh) > 0 else None
    result["unstable"] = nomesh_spread is not None and nomesh_spread > 0.10
    result["checklist"] = [
        f"commit {result['machine']['commit']}; tools: {result['machine']['iperf3']}; "
        f"{result['machine']['sockperf']}; {result['machine']['socat']}",
        f"pinning: {result['settings']['pinning']}",
        f"{reps} interleaved repetitions (rotated order), ratios per repetition, median and "
        f"min-max reported; spread of ours/nomesh L1: "
        f"{', '.join(f'{x:.0%}' for x in spreads) or 'n/a'}; no-mesh L1 spread "
        + (f"{nomesh_spread:.0%}" if nomesh_spread is not None else "n/a")
        + (" > 10%: UNSTABLE, repeat the run" if result["unstable"] else ""),
        "warm-up: one untimed pass per SUT and scenario"
        + ("" if quick else ", and a short untimed pass after every start of a SUT in each "
           "repetition") + f"; iperf3 -O {omit} drops the first {omit} s",
        f"cipher/KX/certs: {result['settings']['cipher']} / X25519 / ECDSA P-256",
        f"worker threads: {a.workers}; allocator: jemalloc (ztunnel's); log level: warn",
        "correctness: iperf3's received byte count must be non-zero (sent and received are "
        "recorded), sockperf completes, every connrate and L7 connection echoes a byte end "
        "to end; errors: "
        f"{len(result['errors'])}",
        "the no-mesh and ruler numbers are from the same run (in result.reps)",
    ] + ([
        f"L7: baseline read after {L7_WARM} connections were opened and closed through the "
        f"SUT (2 s before); peak 1 s after all are open; retention {l7_settle} s after the "
        "burst closed, as RSS and as anonymous RSS (without the binary's file-backed pages); "
        "our ztunnels' jemalloc counters (/debug/memory) at each point are in the JSON",
    ] if result["L7"] else []) + ([
        f"W-series: {result['machine']['nginx']}, {result['machine']['wrk']}; backend nginx "
        "(1 worker, 1 KiB) on the load core; proxy on core 1: a one-worker nginx (TLS 1.3, "
        "P-256, X25519, AES-128-GCM, no session cache/tickets, upstream keep-alive) or our "
        "waypoint (1 worker thread) behind the client's ztunnel on the load core; wrk/"
        "http-rate responses checked (2xx, 1 KiB body), socket errors counted",
    ] if result["W"] else []) + [
        "machine is shared and noisy: only ratios from this run mean anything",
    ]
    (out / f"{started}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{started}.md").write_text(markdown(result))
    print(markdown(result))
    print(json.dumps({"summary": result["summary"]}, indent=2))
    log(f"wrote {out / (started + '.json')}")
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
