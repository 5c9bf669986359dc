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
  external any other ztunnel binary given with --external (e.g. Istio's), fed the same
           local config file (Istio's LOCAL_XDS_PATH format) with FAKE_CA=true
  ours_unpooled  ours with POOL_UNUSED_RELEASE_TIMEOUT=0s and POOL_MAX_STREAMS_PER_CONNECTION=1
           (Istio's knobs): every connection does its own mTLS handshake; runs only L6

Scenarios: L1 iperf3 1 stream (fwd and reverse), L2 iperf3 -P 4, L3 sockperf ping-pong
64 B, L5 new connections/s over the pooled tunnel, L6 new connections/s with a new mTLS
tunnel each (nomesh, ruler, ours_unpooled), L7 idle memory per proxied connection.

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
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HZ = os.sysconf("SC_CLK_TCK")
PORT_IPERF, PORT_SOCKPERF, PORT_ECHO = 5201, 11111, 7000
CLI_IP, NA_CLI, NA_NB, NB_NA, NB_SRV, SRV_IP = (
    "198.18.1.2", "198.18.1.1", "198.18.2.1", "198.18.2.2", "198.18.3.1", "198.18.3.2")
LOAD_CPU, PROXY_CPU = "0", "1"


def log(*a):
    print("[bench]", *a, file=sys.stderr, flush=True)


def sh(*args, check=True, capture=False, **kw):
    r = subprocess.run(list(args), check=False, text=True,
                       stdout=subprocess.PIPE if capture else subprocess.DEVNULL,
                       stderr=subprocess.PIPE, **kw)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
    return r.stdout if capture else r


def _nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 1 << 20), hard))


class Lab:
    """The four namespaces and every process started in them."""

    def __init__(self):
        tag = f"{os.getpid() % 100000}"
        self.ns = {k: f"mb{tag}{k}" for k in ("cli", "na", "nb", "srv")}
        self.procs = []  # Popen objects, killed by PID

    def create(self):
        n = self.ns
        for name in n.values():
            sh("ip", "netns", "add", name)
        pairs = [("cli", "c0", CLI_IP, "na", "a0", NA_CLI),
                 ("na", "a1", NA_NB, "nb", "b1", NB_NA),
                 ("nb", "b0", NB_SRV, "srv", "s0", SRV_IP)]
        for left, lif, lip, right, rif, rip in pairs:
            sh("ip", "-n", n[left], "link", "add", lif, "type", "veth", "peer", "name", rif,
               "netns", n[right])
            sh("ip", "-n", n[left], "addr", "add", f"{lip}/24", "dev", lif)
            sh("ip", "-n", n[right], "addr", "add", f"{rip}/24", "dev", rif)
            sh("ip", "-n", n[left], "link", "set", lif, "up")
            sh("ip", "-n", n[right], "link", "set", rif, "up")
        for name in n.values():
            sh("ip", "-n", name, "link", "set", "lo", "up")
        for node in ("na", "nb"):
            sh("ip", "netns", "exec", n[node], "sysctl", "-qw", "net.ipv4.ip_forward=1")
        sh("ip", "-n", n["cli"], "route", "add", "default", "via", NA_CLI)
        sh("ip", "-n", n["srv"], "route", "add", "default", "via", NB_SRV)
        sh("ip", "-n", n["na"], "route", "add", "198.18.3.0/24", "via", NB_NA)
        sh("ip", "-n", n["nb"], "route", "add", "198.18.1.0/24", "via", NA_NB)

    def spawn(self, ns, args, cpu=None, env=None, stdout=None):
        cmd = ["ip", "netns", "exec", self.ns[ns]]
        if cpu is not None:
            cmd += ["taskset", "-c", cpu]
        p = subprocess.Popen(cmd + list(args), env=env, stdout=stdout or subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, preexec_fn=_nofile, text=True)
        self.procs.append(p)
        return p

    def run(self, ns, args, cpu=None, timeout=120):
        cmd = ["ip", "netns", "exec", self.ns[ns]]
        if cpu is not None:
            cmd += ["taskset", "-c", cpu]
        r = subprocess.run(cmd + list(args), text=True, capture_output=True, timeout=timeout,
                           preexec_fn=_nofile)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} in {ns} failed: {r.stderr.strip()[-500:]}")
        return r.stdout

    def stop(self, procs):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            if p in self.procs:
                self.procs.remove(p)

    def destroy(self):
        self.stop(list(self.procs))
        for name in self.ns.values():
            subprocess.run(["ip", "netns", "del", name], stderr=subprocess.DEVNULL)


def busy_jiffies():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal
    return v[0] + v[1] + v[2] + v[5] + v[6] + v[7]


def proc_cpu(pid):
    """utime + stime of every thread of `pid`, in seconds."""
    total = 0
    try:
        for t in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{t}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    except FileNotFoundError:
        pass
    return total / HZ


def proc_mem(pid):
    """(RSS, PSS) in KiB."""
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1])
    except FileNotFoundError:
        pass
    return rss, pss


def child_pid(popen):
    """The real process under `ip netns exec taskset ...` (exec'd, so the same PID)."""
    return popen.pid


class Sut:
    name = "?"
    target = SRV_IP

    def __init__(self, lab, work):
        self.lab, self.work, self.procs = lab, work, []

    def start(self):
        pass

    def stop(self):
        self.lab.stop(self.procs)
        self.procs = []

    def proxy_pids(self):
        return [child_pid(p) for p in self.procs]


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
        # socat forks a child per connection; count the whole process tree.
        pids = []
        for p in self.procs:
            pids.append(p.pid)
            try:
                kids = sh("pgrep", "-P", str(p.pid), capture=True, check=False).split()
                pids += [int(k) for k in kids]
            except Exception:
                pass
        return pids


LOCAL_CONFIG = f"""workloads:
- uid: bench/cli
  name: cli
  namespace: bench
  serviceAccount: cli
  workloadIps: [{CLI_IP}]
  protocol: HBONE
  node: node-a
  services: {{}}
- uid: bench/srv
  name: srv
  namespace: bench
  serviceAccount: srv
  workloadIps: [{SRV_IP}]
  protocol: HBONE
  node: node-b
  services: {{}}
policies: []
services: []
"""


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
        cli = self.lab.ns["cli"]
        sh("ip", "netns", "exec", cli, "iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp",
           "!", "-o", "lo", "-m", "mark", "!", "--mark", "0x539/0xfff", "-j", "REDIRECT",
           "--to-ports", "15001")
        self.procs.append(self.lab.spawn("cli", [self.binary], cpu=PROXY_CPU,
                                         env=self.env("node-a")))
        self.procs.append(self.lab.spawn("srv", [self.binary], cpu=PROXY_CPU,
                                         env=self.env("node-b")))
        deadline = time.time() + 20
        for ns in ("cli", "srv"):
            while True:
                r = subprocess.run(["ip", "netns", "exec", self.lab.ns[ns], "python3", "-c",
                                    "import urllib.request,sys;"
                                    "sys.exit(0 if urllib.request.urlopen("
                                    "'http://127.0.0.1:15021/healthz/ready',timeout=1)"
                                    ".status==200 else 1)"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                if r.returncode == 0:
                    break
                if time.time() > deadline:
                    raise RuntimeError(f"{self.name} in {ns} not ready after 20 s")
                time.sleep(0.1)

    def stop(self):
        super().stop()
        subprocess.run(["ip", "netns", "exec", self.lab.ns["cli"], "iptables", "-t", "nat",
                        "-F", "OUTPUT"], stderr=subprocess.DEVNULL)


# ---------- scenarios: each returns a dict of metrics for one SUT run ----------

def cpu_window(sut, fn):
    j0, p0 = busy_jiffies(), [proc_cpu(p) for p in sut.proxy_pids()]
    t0 = time.time()
    out = fn()
    wall = time.time() - t0
    j1, p1 = busy_jiffies(), [proc_cpu(p) for p in sut.proxy_pids()]
    return out, (j1 - j0) / HZ, sum(b - a for a, b in zip(p0, p1)), wall


def iperf(lab, sut, seconds, streams=1, reverse=False):
    srv = lab.spawn("srv", ["iperf3", "-s", "-1", "-p", str(PORT_IPERF)], cpu=LOAD_CPU)
    time.sleep(0.3)
    args = ["iperf3", "-c", sut.target, "-p", str(PORT_IPERF), "-t", str(seconds), "-O", "2",
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


def idle_memory(lab, sut, count, settle, tool, work):
    srv = lab.spawn("srv", [tool, "server", "--listen", f"{SRV_IP}:{PORT_ECHO}"], cpu=LOAD_CPU)
    time.sleep(0.3)
    ready = work / f"hold-{sut.name}-{count}"
    ready.unlink(missing_ok=True)
    pids = sut.proxy_pids()
    before = [proc_mem(p) for p in pids]
    holder = lab.spawn("cli", [tool, "hold", "--to", f"{sut.target}:{PORT_ECHO}", "--count",
                               str(count), "--ready-file", str(ready), "--seconds", "600"],
                       cpu=LOAD_CPU, stdout=subprocess.PIPE)
    deadline = time.time() + 120
    while not ready.exists():
        if time.time() > deadline or holder.poll() is not None:
            lab.stop([holder, srv])
            raise RuntimeError(f"holder for {sut.name} did not open {count} connections")
        time.sleep(0.1)
    time.sleep(1.0)
    peak = [proc_mem(p) for p in pids]
    ready.unlink()
    out, _ = holder.communicate(timeout=60)
    lab.procs.remove(holder)
    held = json.loads(out)
    time.sleep(settle)
    after = [proc_mem(p) for p in pids]
    lab.stop([srv])
    per = [((pk[0] - b[0]) * 1024 / count, (pk[1] - b[1]) * 1024 / count)
           for b, pk in zip(before, peak)]
    return {"opened": held["opened"], "failed": held["failed"],
            "rss_kb": {"before": [b[0] for b in before], "peak": [p[0] for p in peak],
                       "after": [a[0] for a in after]},
            "bytes_per_conn_rss": [round(p[0]) for p in per],
            "bytes_per_conn_pss": [round(p[1]) for p in per],
            "retained_kb_after": [a[0] - b[0] for a, b in zip(after, before)],
            "retained_pct_after": [round(100 * (a[0] - b[0]) / b[0], 1) if b[0] else None
                                   for a, b in zip(after, before)]}


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
            "socat": first(["socat", "-V"]), "rustc": first(["rustc", "--version"])}


def median_range(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None
    return {"median": round(statistics.median(xs), 4), "min": round(min(xs), 4),
            "max": round(max(xs), 4), "n": len(xs)}


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
        over = per_rep(scn, lambda o, r, n: (
            (o["sys_cpu_s_per_gb"] - n["sys_cpu_s_per_gb"]) /
            (r["sys_cpu_s_per_gb"] - n["sys_cpu_s_per_gb"])
            if r["sys_cpu_s_per_gb"] - n["sys_cpu_s_per_gb"] > 0 else None))
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
                  "retained after close % |", "|---|---|---|---|"]
        for count, by_sut in result["L7"].items():
            for sut, m in by_sut.items():
                lines.append(f"| {count} | {sut} | {m['bytes_per_conn_rss']} | "
                             f"{m['retained_pct_after']} |")
    lines += ["", "## Honesty checklist", ""] + [f"- {c}" for c in result["checklist"]]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer, shorter repetitions (<3 min)")
    ap.add_argument("--reps", type=int)
    ap.add_argument("--scenarios", default="L1,L1R,L2,L3,L5,L6,L7")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--external", help="path of another ztunnel binary to compare (e.g. Istio's)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench: needs root (network namespaces, iptables)")
    for tool in ("iperf3", "sockperf", "socat", "iptables", "taskset"):
        if not shutil.which(tool):
            sys.exit(f"bench: {tool} is missing (make bench installs iperf3 sockperf socat)")
    quick = a.quick
    reps = a.reps or (3 if quick else 5)
    t_bulk = 3 if quick else 10
    t_lat = 3 if quick else 10
    t_conn = 2 if quick else 5
    l7_counts = [1000] if quick else [1000, 10000]
    l7_settle = 8 if quick else 60
    scenarios = [s.strip() for s in a.scenarios.split(",") if s.strip()]
    release = ROOT / "target" / "release"
    zt, tool, meshctl = release / "ztunnel", release / "mesh-bench", release / "meshctl"
    for b in (zt, tool, meshctl):
        if not b.exists():
            sys.exit(f"bench: {b} missing; run `cargo build --release -p ztunnel -p mesh-bench "
                     "-p meshctl` (make bench does)")

    work = Path(tempfile.mkdtemp(prefix="mesh-bench-"))
    (work / "local.yaml").write_text(LOCAL_CONFIG)
    sh(str(meshctl), "ca", "create", str(work / "ca"))
    lab = Lab()
    started = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    result = {"started": started, "machine": versions(),
              "settings": {"quick": quick, "reps": reps, "bulk_s": t_bulk, "latency_s": t_lat,
                           "connrate_s": t_conn, "l7_counts": l7_counts, "l7_settle_s": l7_settle,
                           "workers": a.workers, "pinning": f"load cpu {LOAD_CPU}, proxies cpu "
                           f"{PROXY_CPU}", "cipher": "rustls default order (AES-128-GCM first)",
                           "kx": "X25519", "certs": "ECDSA P-256 from a local root",
                           "log_level": "warn", "allocator": "jemalloc (ztunnel's global allocator)"},
              "reps": [], "L7": {}, "errors": []}

    def stop_all(*_):
        lab.destroy()
        shutil.rmtree(work, ignore_errors=True)
        sys.exit(130)

    signal.signal(signal.SIGINT, stop_all)
    signal.signal(signal.SIGTERM, stop_all)
    try:
        lab.create()
        unpooled = {"POOL_UNUSED_RELEASE_TIMEOUT": "0s", "POOL_MAX_STREAMS_PER_CONNECTION": "1"}
        suts = [NoMesh(lab, work), Ruler(lab, work),
                Ztunnel(lab, work, str(zt), "ours", a.workers)]
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
            return not (scn == "L6" and isinstance(sut, Ztunnel))

        def one(scn, sut, short=False):
            t = 1 if short else None
            if scn == "L1":
                return iperf(lab, sut, t or t_bulk)
            if scn == "L1R":
                return iperf(lab, sut, t or t_bulk, reverse=True)
            if scn == "L2":
                return iperf(lab, sut, t or t_bulk, streams=4)
            if scn == "L3":
                return sockperf(lab, sut, t or t_lat)
            if scn in ("L5", "L6"):
                return connrate(lab, sut, t or t_conn, str(tool))
            raise ValueError(scn)

        timed = [s for s in scenarios if s != "L7"]
        log(f"warm-up: one short untimed pass per SUT and scenario ({', '.join(timed)})")
        for sut in suts:
            if not any(runs(sut, scn) for scn in timed):
                continue
            sut.start()
            try:
                for scn in timed:
                    if runs(sut, scn):
                        one(scn, sut, short=True)
            finally:
                sut.stop()
        for rep in range(reps):
            order = suts[rep % len(suts):] + suts[:rep % len(suts)]
            row = {}
            log(f"repetition {rep + 1}/{reps}: {' '.join(s.name for s in order)}")
            for sut in order:
                if not any(runs(sut, scn) for scn in timed):
                    continue
                sut.start()
                try:
                    for scn in timed:
                        if not runs(sut, scn):
                            continue
                        m = one(scn, sut)
                        row.setdefault(scn, {})[sut.name] = m
                        if m.get("errors") or m.get("retransmits", 0) < 0:
                            result["errors"].append(f"rep {rep} {scn} {sut.name}: {m}")
                finally:
                    sut.stop()
            result["reps"].append(row)
        if "L7" in scenarios:
            for count in l7_counts:
                for sut in suts:
                    if sut.name in ("nomesh", "ruler") or not runs(sut, "L7"):
                        continue  # no long-lived proxy process to measure
                    sut.start()
                    try:
                        log(f"L7: {count} idle connections through {sut.name}")
                        m = idle_memory(lab, sut, count, l7_settle, str(tool), work)
                        result["L7"].setdefault(str(count), {})[sut.name] = m
                        if m["failed"]:
                            result["errors"].append(f"L7 {count} {sut.name}: {m['failed']} failed")
                    finally:
                        sut.stop()
    finally:
        lab.destroy()
        shutil.rmtree(work, ignore_errors=True)

    detail = summarize(result["reps"], names)
    result["summary_detail"] = detail
    result["summary"] = flat_summary(detail)
    for count, by_sut in result["L7"].items():
        for sut, m in by_sut.items():
            result["summary"].setdefault("L7", {})[f"{sut}_{count}_bytes_per_conn"] = max(
                m["bytes_per_conn_rss"])
            result["summary"]["L7"][f"{sut}_{count}_retained_pct"] = max(
                x for x in m["retained_pct_after"] if x is not None)
    spreads = [v["max"] / v["min"] - 1 for r in [detail.get("L1", {})]
               for s in r.values() for v in [s.get("vs_nomesh")] if v and v["min"]]
    result["checklist"] = [
        f"commit {result['machine']['commit']}; tools: {result['machine']['iperf3']}; "
        f"{result['machine']['sockperf']}; {result['machine']['socat']}",
        f"pinning: {result['settings']['pinning']}",
        f"{reps} interleaved repetitions (rotated order), ratios per repetition, median and "
        f"min-max reported; spread of ours/nomesh L1: "
        f"{', '.join(f'{x:.0%}' for x in spreads) or 'n/a'}",
        "warm-up: one untimed pass per SUT and scenario; iperf3 -O 2 drops the first 2 s",
        f"cipher/KX/certs: {result['settings']['cipher']} / X25519 / ECDSA P-256",
        f"worker threads: {a.workers}; allocator: jemalloc (ztunnel's); log level: warn",
        "correctness: iperf3 byte counts from both ends, sockperf completes, every connrate "
        "and L7 connection echoes a byte end to end; errors: "
        f"{len(result['errors'])}",
        "the no-mesh and ruler numbers are from the same run (in result.reps)",
        "machine is shared and noisy: only ratios from this run mean anything",
    ]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{started}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{started}.md").write_text(markdown(result))
    print(markdown(result))
    print(json.dumps({"summary": result["summary"]}, indent=2))
    log(f"wrote {out / (started + '.json')}")
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
