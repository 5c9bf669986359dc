"""What the benchmark scripts share: the four-namespace topology, process control, and CPU
and memory accounting from /proc (performance.md §4.1-§4.2).

Everything started through a `Lab` is killed by PID and every namespace it made is deleted
by name; nothing else on the machine is touched.
"""

import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HZ = os.sysconf("SC_CLK_TCK")
PORT_IPERF, PORT_SOCKPERF, PORT_ECHO = 5201, 11111, 7000
CLI_IP, NA_CLI, NA_NB, NB_NA, NB_SRV, SRV_IP = (
    "198.18.1.2", "198.18.1.1", "198.18.2.1", "198.18.2.2", "198.18.3.1", "198.18.3.2")
LOAD_CPU, PROXY_CPU = "0", "1"


def hbone_workload(name, ip, node):
    """One HBONE pod of namespace `bench` in a local config file (LOCAL_XDS_PATH format)."""
    return (f"- uid: bench/{name}\n  name: {name}\n  namespace: bench\n"
            f"  serviceAccount: {name}\n  workloadIps: [{ip}]\n  protocol: HBONE\n"
            f"  node: {node}\n")


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
    """CPU seconds of process `pid`: utime + stime of all its threads, exited ones included,
    plus cutime + cstime of its reaped children (socat forks one per connection)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    # Fields 14-17 of stat(5), counted from 1; the split starts at field 3 (state).
    return sum(int(x) for x in fields[11:15]) / HZ


def proc_rss_anon(pid):
    """Anonymous resident memory (heap, stacks) in KiB: RSS without the file-backed pages
    (the binary's code, which is page cache and is touched once)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
    except FileNotFoundError:
        pass
    return 0


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


class Sut:
    """A system under test: `start`/`stop` its processes (started through the Lab, so they
    are killed by PID), `proxy_pids` is whose CPU and memory are charged to it, and
    `target` is the address the load tools connect to."""
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
        # `ip netns exec` and `taskset` exec the command, so the Popen PID is the proxy's.
        return [p.pid for p in self.procs]

    def helper_pids(self):
        """Processes reported beside the proxy but not charged to it (none by default)."""
        return []

    def admin_namespaces(self):
        """Lab namespaces whose 127.0.0.1:15000 is one of our ztunnels' admin port, in
        `proxy_pids` order (none by default: not every SUT is ours)."""
        return []

    def allocator_stats(self):
        """Our ztunnels' `/debug/memory` (jemalloc's counters), one dict per admin
        namespace; None for a proxy that did not answer."""
        out = []
        for ns in self.admin_namespaces():
            try:
                out.append(json.loads(self.lab.run(
                    ns, ["curl", "-sf", "-m", "5", "http://127.0.0.1:15000/debug/memory"])))
            except (RuntimeError, ValueError, subprocess.TimeoutExpired):
                out.append(None)
        return out


def cpu_window(sut, fn):
    """Runs `fn`; returns its result, system-wide busy CPU seconds, the SUT's processes' CPU
    seconds, and the wall time."""
    pids = sut.proxy_pids()
    j0, p0 = busy_jiffies(), [proc_cpu(p) for p in pids]
    t0 = time.monotonic()
    out = fn()
    wall = time.monotonic() - t0
    j1, p1 = busy_jiffies(), [proc_cpu(p) for p in pids]
    return out, (j1 - j0) / HZ, sum(max(b - a, 0.0) for a, b in zip(p0, p1)), wall


def median_range(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None
    return {"median": round(statistics.median(xs), 4), "min": round(min(xs), 4),
            "max": round(max(xs), 4), "n": len(xs)}


def wait_until(lab, ns, argv, what, timeout=20):
    """Runs `argv` in namespace `ns` every 0.1 s until it exits 0; raises after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        r = subprocess.run(["ip", "netns", "exec", lab.ns[ns]] + list(argv),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if r.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not ready after {timeout} s")
        time.sleep(0.1)


def wait_http(lab, ns, url, what, timeout=20):
    """Waits until a GET of `url` from namespace `ns` answers 200."""
    probe = ("import urllib.request,sys;"
             f"sys.exit(0 if urllib.request.urlopen('{url}',timeout=1).status==200 else 1)")
    wait_until(lab, ns, ["python3", "-c", probe], f"{what} ({url})", timeout)


CAPTURE_RULE = ["OUTPUT", "-p", "tcp", "!", "-o", "lo", "-m", "mark", "!", "--mark",
                "0x539/0xfff", "-j", "REDIRECT", "--to-ports", "15001"]


def capture_outbound(lab, ns):
    """Dedicated-mode capture in `ns`: its TCP egress (but ztunnel's own, mark 0x539) to :15001."""
    sh("ip", "netns", "exec", lab.ns[ns], "iptables", "-t", "nat", "-A", *CAPTURE_RULE)


def release_capture(lab, ns):
    """Deletes the rule `capture_outbound` added (and nothing else)."""
    subprocess.run(["ip", "netns", "exec", lab.ns[ns], "iptables", "-t", "nat"] + ["-D"]
                   + CAPTURE_RULE, stderr=subprocess.DEVNULL)
