"""What lab.py and the scenario modules share: errors, logging, process and netns helpers,
the walkthrough's output (steps, checks, access-log lines) and the lab's Service addresses."""

import os
import re
import subprocess
import sys
import time

VIP, VIP_PORT, APP_PORT = "10.96.0.20", 8000, 8080
GRPC_PORT = 9090  # httpbin's gRPC port, on the pod and on the Service (named grpc)
TRUST_DOMAIN = "cluster.local"


class LabError(Exception):
    pass


class GiveUp(LabError):
    """Waiting longer cannot help: wait_for stops at once."""


class ProcessDied(GiveUp):
    """A component exited."""


def bold(s):
    return f"\033[1m{s}\033[0m" if sys.stdout.isatty() else s


def log(msg=""):
    print(msg, flush=True)


def run(argv, check=True, timeout=30, input=None, quiet=False):
    p = subprocess.run(argv, input=input, capture_output=True, timeout=timeout,
                       text=isinstance(input, str) or input is None)
    if check and p.returncode != 0:
        raise LabError(f"`{' '.join(argv)}` failed ({p.returncode}): {(p.stderr or p.stdout).strip()}")
    return p


def nsx(ns, *argv):
    return ["ip", "netns", "exec", ns, *argv]


def wait_for(what, fn, timeout=30.0, every=0.2):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            v = fn()
            if v:
                return v
        except GiveUp:
            raise
        except Exception as e:  # noqa: BLE001 (retrying until the deadline)
            last = e
        time.sleep(every)
    raise LabError(f"timed out after {timeout:.0f}s waiting for {what}" + (f" (last error: {last})" if last else ""))


def write_atomic(path, text):
    d, name = os.path.split(path)
    tmp = os.path.join(d, f".{name}.lab-tmp")
    with open(tmp, "w") as f:
        f.write(text)
    os.rename(tmp, path)


# ---------------------------------------------------------------------------------------------
# The walkthrough's output


KV = re.compile(r'([\w.]+)=("(?:[^"\\]|\\.)*"|.*?)(?=\s[\w.]+=|$)')


def fields(line):
    return {k: v.strip('"') for k, v in KV.findall(line)}


def short_access(line):
    f = fields(line)
    keep = ["direction", "src.addr", "src.identity", "dst.addr", "dst.hbone_addr", "dst.service", "dst.identity",
            "bytes_sent", "bytes_recv", "policy", "reason", "error"]
    return "  ".join(f"{k}={f[k]}" for k in keep if f.get(k))


def show_access(node, line):
    """An access-log line, its fields on three short lines (the raw line is in the log)."""
    f = fields(line)
    src = f.get("src.addr", "").replace("[::ffff:", "").replace("]", "")
    via = f" via HBONE {f['dst.hbone_addr']}" if f.get("dst.hbone_addr") else ""
    svc = f" ({f['dst.service']})" if f.get("dst.service") else ""
    pad = " " * (len(node) + 6)
    log(f"    {node}: {f.get('direction', '?'):<8} src {src:<18} {f.get('src.identity') or '(no identity: plaintext)'}")
    log(f"    {pad}       dst {f.get('dst.addr', ''):<18} {f.get('dst.identity', '')}{svc}{via}")
    if f.get("policy"):
        log(f"    {pad}       DENIED by policy {f['policy']}: {f.get('reason', '')}")
    else:
        log(f"    {pad}       bytes sent {f.get('bytes_sent', '?')} received {f.get('bytes_recv', '?')}"
            + (f"  error: {f['error']}" if f.get("error") else ""))


class Steps:
    def __init__(self):
        self.n = 0
        self.t0 = time.monotonic()

    def __call__(self, title, lines):
        self.n += 1
        log()
        log(bold(f"[{self.n}] {title}") + f"   (+{time.monotonic() - self.t0:.0f}s)")
        for l in lines:
            log(f"    {l}")


def check(cond, what):
    if not cond:
        raise LabError(what)
    log(f"    ok: {what}")
