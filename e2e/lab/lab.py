#!/usr/bin/env python3
"""The netns lab: a two-node "cluster" made of network namespaces, running the mesh's real
components (istiod-lite, the node agent mesh-cni-agent with its CNI plugin mesh-cni, and
ztunnel in in-pod shared mode), with pods wired by Debian's CNI plugins.

  python3 e2e/lab/lab.py demo            # up, the walkthrough with checks, down (make demo)
  python3 e2e/lab/lab.py up              # up and leave it running (make demo-up)
  python3 e2e/lab/lab.py down [STATE]    # tear down what `up` started (make demo-down)
  python3 e2e/lab/lab.py exec POD -- CMD # run CMD inside a pod's netns (pod = name, e.g. sleep)
  python3 e2e/lab/lab.py status          # what is running, where the logs are
  python3 e2e/lab/lab.py deps            # check (and apt-get install) what the lab needs

Needs root. Everything it creates carries a per-run prefix (ml<pid>-...), is recorded in a
state file before it is created, and is removed by name and PID on exit, on failure, on
Ctrl-C/SIGTERM, or by `down`. No namespace gets a route to the machine's interfaces: the
router has no default route. See docs/lab.md.

The walkthrough's waypoint steps are in waypoint_scenarios.py; what both share is labutil.py.
"""

import argparse
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.dont_write_bytecode = True
sys.path.insert(0, HERE)
import cnirt  # noqa: E402
import waypoint_scenarios  # noqa: E402
from labutil import (APP_PORT, GRPC_PORT, TRUST_DOMAIN, VIP, VIP_PORT, LabError, ProcessDied, Steps,  # noqa: E402
                     bold, check, log, nsx, run, short_access, show_access, wait_for, write_atomic)

BIN = os.path.abspath(os.environ.get("MESH_LAB_BIN", os.path.join(REPO, "target", "release")))
POINTER_DIR = "/run/mesh-lab"
POINTER = os.path.join(POINTER_DIR, "current")
PATH_ENV = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

ISTIOD_IP = "10.100.0.1"
# The pods' resolv.conf names a cluster DNS address nothing listens on: captured pods are
# answered by ztunnel's DNS proxy; nothing else resolves (the lab has no way out).
CLUSTER_DNS = "10.96.0.10"
MARKER = "LAB-PLAINTEXT-MARKER-7f3a"
CNI_PLUGINS = ["bridge", "host-local", "loopback", "portmap"]
# command -> Debian package
APT_DEPS = {"ip": "iproute2", "iptables": "iptables", "ipset": "ipset", "curl": "curl",
            "ss": "iproute2"}

PODS = [  # name, namespace, node, service account, labels, app
    dict(name="httpbin", namespace="demo", node="node2", sa="httpbin", labels={"app": "httpbin"}, app="httpbin"),
    dict(name="sleep", namespace="demo", node="node1", sa="sleep", labels={"app": "sleep"}, app="sleep"),
    dict(name="legacy", namespace="legacy", node="node1", sa="default", labels={"app": "legacy"}, app="sleep"),
]
NAMESPACES = {"demo": {"istio.io/dataplane-mode": "ambient"}, "legacy": {}}

# Namespace-wide (no selector). A selector policy works too: ztunnel authorizes each stream
# against the workload as it is now (docs/lab.md, "Issue found by the lab").
POLICY = f"""apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-sleep
  namespace: demo
spec:
  action: DENY
  rules:
  - from:
    - source:
        principals: ["{TRUST_DOMAIN}/ns/demo/sa/sleep"]
"""


# Dependencies


def missing_deps():
    need = set()
    for cmd, pkg in APT_DEPS.items():
        if shutil.which(cmd) is None:
            need.add(pkg)
    if any(not os.access(f"/usr/lib/cni/{p}", os.X_OK) for p in CNI_PLUGINS):
        need.add("containernetworking-plugins")
    return sorted(need)


def ensure_deps(install=True, binaries=True):
    need = missing_deps()
    if need and install:
        log(f"installing {' '.join(need)} (apt-get)")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *need], check=True, env=env)
        need = missing_deps()
    if need:
        raise LabError(f"missing packages: {' '.join(need)}")
    if os.geteuid() != 0:
        raise LabError("the lab needs root (network namespaces, iptables)")
    if not binaries:
        return
    bins = [os.path.join(BIN, b) for b in ("ztunnel", "mesh-cni", "mesh-cni-agent", "istiod-lite")]
    absent = [b for b in bins if not os.access(b, os.X_OK)]
    if absent:
        raise LabError(f"missing binaries {' '.join(absent)}: run `cargo build --release -p ztunnel -p cni-plugin -p istiod-lite`")


# ---------------------------------------------------------------------------------------------
# State: everything created is recorded here first, so `down` can remove exactly that.


class State:
    def __init__(self, path, data):
        self.path, self.d = path, data

    @classmethod
    def new(cls):
        prefix = f"ml{os.getpid()}"
        work = f"/tmp/mesh-lab-{prefix}"
        os.makedirs(work, mode=0o700)
        data = {"prefix": prefix, "work": work, "netns": [], "procs": [], "pods": {},
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        s = cls(os.path.join(work, "state.json"), data)
        s.save()
        return s

    @classmethod
    def load(cls, path):
        with open(path) as f:
            return cls(path, json.load(f))

    def save(self):
        write_atomic(self.path, json.dumps(self.d, indent=1))

    def ns(self, short):
        return f"{self.d['prefix']}-{short}"

    def path_of(self, *p):
        return os.path.join(self.d["work"], *p)


def proc_alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def proc_matches(pid, exe):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    return exe.encode() in argv or (argv and argv[0].endswith(b"ip"))


class Lab:
    def __init__(self, state, children=None):
        self.s = state
        self.children = children if children is not None else {}
        self.work = state.d["work"]
        self.logs = state.path_of("logs")

    # -- processes ---------------------------------------------------------------------------

    def spawn(self, name, netns, argv, env, extra_env=None):
        os.makedirs(self.logs, exist_ok=True)
        logf = os.path.join(self.logs, f"{name}.log")
        e = {"PATH": PATH_ENV, "HOME": "/root"}
        e.update(env)
        f = open(logf, "ab")
        p = subprocess.Popen(nsx(netns, *argv), env=e, stdout=f, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, start_new_session=True)
        f.close()
        self.children[p.pid] = p
        self.s.d["procs"].append({"name": name, "pid": p.pid, "exe": argv[0], "netns": netns, "log": logf})
        self.s.save()
        return p

    def proc(self, name):
        for pr in self.s.d["procs"]:
            if pr["name"] == name:
                return pr
        raise KeyError(name)

    def check_alive(self, name):
        pr = self.proc(name)
        if not proc_alive(pr["pid"]):
            raise ProcessDied(f"{name} (pid {pr['pid']}) exited; its log {pr['log']} ends with:\n" + tail(pr["log"]))

    # -- topology ----------------------------------------------------------------------------

    def add_netns(self, short, dns_namespace=None):
        name = self.s.ns(short)
        self.s.d["netns"].append(name)
        self.s.save()
        run(["ip", "netns", "add", name])
        run(["ip", "-n", name, "link", "set", "lo", "up"])
        if dns_namespace:
            # `ip netns exec` bind-mounts /etc/netns/<name>/resolv.conf over /etc/resolv.conf:
            # the pod's DNS config, as the kubelet writes it (ClusterFirst).
            d = os.path.join("/etc/netns", name)
            self.s.d.setdefault("etc_netns", []).append(d)
            self.s.save()
            os.makedirs(d, exist_ok=True)
            write_atomic(os.path.join(d, "resolv.conf"),
                         f"search {dns_namespace}.svc.cluster.local svc.cluster.local cluster.local\n"
                         f"nameserver {CLUSTER_DNS}\noptions ndots:5\n")
        return name

    @staticmethod
    def forwarding(ns):
        # /proc/sys/net is per netns: written from inside ns, it sets ns's own sysctl.
        run(nsx(ns, "sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"))

    def build_topology(self):
        rtr = self.add_netns("rtr")
        run(["ip", "-n", rtr, "addr", "add", f"{ISTIOD_IP}/32", "dev", "lo"])
        self.forwarding(rtr)
        for n in (1, 2):
            node = self.add_netns(f"node{n}")
            run(["ip", "-n", rtr, "link", "add", f"r-n{n}", "type", "veth", "peer", "name", "eth0", "netns", node])
            run(["ip", "-n", rtr, "addr", "add", f"10.100.{n}.1/24", "dev", f"r-n{n}"])
            run(["ip", "-n", rtr, "link", "set", f"r-n{n}", "up"])
            run(["ip", "-n", node, "addr", "add", f"10.100.{n}.2/24", "dev", "eth0"])
            run(["ip", "-n", node, "link", "set", "eth0", "up"])
            run(["ip", "-n", node, "route", "add", "default", "via", f"10.100.{n}.1"])
            self.forwarding(node)
            run(["ip", "-n", rtr, "route", "add", f"10.244.{n}.0/24", "via", f"10.100.{n}.2"])
            self.write_conflists(n)
        # Accounting of pod-to-pod traffic between the nodes (the router forwards all of it).
        acct = (
            "*filter\n:LAB-ACCT - [0:0]\n-A FORWARD -j LAB-ACCT\n"
            f"-A LAB-ACCT -s 10.244.0.0/16 -d 10.244.0.0/16 -m string --string {MARKER} --algo bm -j RETURN\n"
            "-A LAB-ACCT -s 10.244.0.0/16 -d 10.244.0.0/16 -p tcp --dport 15008 -j RETURN\n"
            "-A LAB-ACCT -s 10.244.0.0/16 -d 10.244.0.0/16 -p tcp --sport 15008 -j RETURN\n"
            "-A LAB-ACCT -s 10.244.0.0/16 -d 10.244.0.0/16 -j RETURN\nCOMMIT\n"
        )
        run(nsx(rtr, "iptables-restore", "--noflush"), input=acct)

    def write_conflists(self, n):
        d = self.s.path_of(f"node{n}")
        for sub in ("net.d", "bin", "ipam"):
            os.makedirs(os.path.join(d, sub), exist_ok=True)
        podnet = {
            "cniVersion": "1.0.0", "name": "podnet",
            "plugins": [
                {"type": "bridge", "bridge": "cni0", "isGateway": True, "ipMasq": False, "hairpinMode": True,
                 "ipam": {"type": "host-local", "ranges": [[{"subnet": f"10.244.{n}.0/24"}]],
                          "routes": [{"dst": "0.0.0.0/0"}], "dataDir": os.path.join(d, "ipam")}},
                {"type": "portmap", "capabilities": {"portMappings": True}, "snat": True},
            ],
        }
        write_atomic(os.path.join(d, "net.d", "10-podnet.conflist"), json.dumps(podnet, indent=1))
        # containerd-style loopback network, kept outside the conf dir the agent chains into.
        lo = {"cniVersion": "1.0.0", "name": "cni-loopback", "plugins": [{"type": "loopback"}]}
        write_atomic(os.path.join(d, "loopback.conflist"), json.dumps(lo))

    # -- Kubernetes objects ------------------------------------------------------------------

    def write_cluster(self):
        """The agents' files source (cluster.yaml) and istiod-lite's manifests, from one model."""
        pods = self.s.d["pods"]
        cluster = {
            "namespaces": [{"name": n, "labels": l} for n, l in NAMESPACES.items()],
            "pods": [{
                "uid": p["uid"], "name": p["name"], "namespace": p["namespace"], "nodeName": p["nodeName"],
                "labels": p["labels"], "podIPs": [p["ip"]] if p.get("ip") else [],
                "serviceAccountName": p["sa"], "hostNetwork": False, "phase": p["phase"],
            } for p in pods.values()],
        }
        write_atomic(self.s.path_of("cluster", "cluster.yaml"), json.dumps(cluster, indent=1))
        man = self.s.path_of("manifests")
        for p in pods.values():
            status = {"phase": p["phase"]}
            if p.get("ip"):
                status.update(podIP=p["ip"], podIPs=[{"ip": p["ip"]}],
                              conditions=[{"type": "Ready", "status": "True"}])
            obj = {
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": p["name"], "namespace": p["namespace"], "uid": p["uid"], "labels": p["labels"]},
                "spec": {"nodeName": p["nodeName"], "serviceAccountName": p["sa"],
                         "containers": [{"name": p["app"], "image": f"lab/{p['app']}",
                                         "ports": [{"name": "http", "containerPort": APP_PORT}, {"name": "grpc", "containerPort": GRPC_PORT}]
                                         if p["app"] == "httpbin" else []}]},
                "status": status,
            }
            write_atomic(os.path.join(man, f"pod-{p['namespace']}-{p['name']}.yaml"), json.dumps(obj, indent=1))

    def write_static_manifests(self, waypoint_ip=None):
        man = self.s.path_of("manifests")
        os.makedirs(man, exist_ok=True)
        os.makedirs(self.s.path_of("cluster"), exist_ok=True)
        docs = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": n, "labels": l}}
                for n, l in NAMESPACES.items()]
        svc_labels = {}
        if waypoint_ip:
            # The Gateway as istiod-lite sees it once its waypoint is deployed (status.addresses),
            # and the Service bound to it.
            docs.append({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
                         "metadata": {"name": "waypoint", "namespace": "demo"},
                         "spec": {"gatewayClassName": "istio-waypoint",
                                  "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]},
                         "status": {"addresses": [{"type": "IPAddress", "value": waypoint_ip}]}})
            svc_labels = {"istio.io/use-waypoint": "waypoint"}
        docs.append({"apiVersion": "v1", "kind": "Service",
                     "metadata": {"name": "httpbin", "namespace": "demo", "labels": svc_labels},
                     "spec": {"clusterIP": VIP, "selector": {"app": "httpbin"},
                              "ports": [{"name": "http", "port": VIP_PORT, "targetPort": APP_PORT},
                                        {"name": "grpc", "port": GRPC_PORT, "targetPort": GRPC_PORT, "appProtocol": "grpc"}]}})
        write_atomic(os.path.join(man, "00-namespaces-services.yaml"), "\n---\n".join(json.dumps(d) for d in docs))

    # -- components --------------------------------------------------------------------------

    def start_istiod(self):
        tokens = []
        for n in (1, 2):
            tok = secrets.token_hex(24)
            path = self.s.path_of(f"node{n}", "ztunnel-token")
            with open(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
                f.write(tok)
            tokens.append(f"- {{token: {tok}, serviceAccount: istio-system/ztunnel, node: node{n}}}")
        # The waypoint's projected token (its own identity only).
        tok = secrets.token_hex(24)
        with open(os.open(self.s.path_of("waypoint-token"), os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
            f.write(tok)
        tokens.append(f"- {{token: {tok}, serviceAccount: demo/waypoint, node: {waypoint_scenarios.WAYPOINT_POD['node']}}}")
        tf = self.s.path_of("static-tokens.yaml")
        with open(os.open(tf, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
            f.write("\n".join(tokens) + "\n")
        os.makedirs(self.s.path_of("ca"), exist_ok=True)
        self.spawn("istiod-lite", self.s.ns("rtr"), [
            os.path.join(BIN, "istiod-lite"), "--manifests", self.s.path_of("manifests"),
            "--ca-dir", self.s.path_of("ca"), "--static-tokens", tf,
            "--grpc-addr", f"{ISTIOD_IP}:15012", "--monitor-addr", "127.0.0.1:15014",
            "--manifests-poll", "1s"], {"RUST_LOG": "info"})
        wait_for("istiod-lite ready (/ready on 127.0.0.1:15014 in the router netns)",
                 lambda: self.check_alive("istiod-lite") or
                 self.http(self.s.ns("rtr"), "http://127.0.0.1:15014/ready", check=False)[0] == 200, 60)
        wait_for("istiod-lite's root certificate", lambda: os.path.exists(self.s.path_of("ca", "root-cert.pem")))

    def start_node(self, n):
        node, d = f"node{n}", self.s.path_of(f"node{n}")
        # ztunnel's own upstream for names the mesh does not know (nothing answers there).
        write_atomic(self.s.path_of("resolv.conf"), f"nameserver {CLUSTER_DNS}\n")
        self.spawn(f"agent-{node}", self.s.ns(node), [os.path.join(BIN, "mesh-cni-agent")], {
            "NODE_NAME": node,
            "ZTUNNEL_UDS": os.path.join(d, "ztunnel.sock"),
            "CNI_AGENT_SOCKET": os.path.join(d, "cni.sock"),
            "POD_SOURCE": "files",
            "POD_SOURCE_DIR": self.s.path_of("cluster"),
            "HOST_NETNS": f"/run/netns/{self.s.ns(node)}",
            # Pods' UDP/TCP 53 goes to ztunnel's DNS proxy on localhost:15053.
            "AMBIENT_DNS_CAPTURE": "true",
            "AMBIENT_IPV6": "false",
            "CHAINED_CNI_PLUGIN": "true",
            "CNI_BIN_DIR": os.path.join(d, "bin"),
            "CNI_CONF_DIR": os.path.join(d, "net.d"),
            "CNI_PLUGIN_BINARY": os.path.join(BIN, "mesh-cni"),
            "RESYNC_INTERVAL": "1s",
            "RUST_LOG": "info",
        })
        conflist = os.path.join(d, "net.d", "10-podnet.conflist")

        def chained():
            self.check_alive(f"agent-{node}")
            with open(conflist) as f:
                return [p["type"] for p in json.load(f)["plugins"]][-1] == "mesh-cni"
        wait_for(f"the {node} agent to chain mesh-cni into {conflist}", chained, 30)
        self.spawn(f"ztunnel-{node}", self.s.ns(node), [os.path.join(BIN, "ztunnel")], {
            "PROXY_MODE": "shared",
            "INPOD_UDS": os.path.join(d, "ztunnel.sock"),
            "NODE_NAME": node,
            "XDS_ADDRESS": f"https://{ISTIOD_IP}:15012",
            "ALT_XDS_HOSTNAME": "istiod.istio-system.svc",
            "XDS_ROOT_CA": self.s.path_of("ca", "root-cert.pem"),
            "AUTH_TOKEN_PATH": os.path.join(d, "ztunnel-token"),
            "POD_NAME": f"ztunnel-{node}", "POD_NAMESPACE": "istio-system",
            "INSTANCE_IP": f"10.100.{n}.2",
            "PRESERVE_SOURCE_IP": "true",
            "DNS_RESOLV_CONF": self.s.path_of("resolv.conf"),
            "RUST_LOG": "info", "LOG_FORMAT": "plain",
        })

    def ztunnel_ready(self, n):
        self.check_alive(f"ztunnel-node{n}")
        code, body = self.http(self.s.ns(f"node{n}"), "http://127.0.0.1:15021/healthz/ready", check=False)
        return code == 200

    def ztunnel_knows(self, n):
        node = f"node{n}"
        code, body = self.http(self.s.ns(node), "http://127.0.0.1:15000/config_dump", check=False)
        if code != 200:
            return False
        dump = json.loads(body)
        certs = json.dumps(dump.get("certificates"))
        pods = self.s.d["pods"].values()
        local = [p for p in pods if p["nodeName"] == node and NAMESPACES[p["namespace"]]]
        del certs, local  # certificates are fetched on first use (no prefetch for pods added later)
        return VIP in body and all(p["ip"] in body for p in pods if p.get("ip"))

    def http(self, ns, url, check=True, timeout=5, data_file=None):
        argv = ["curl", "-sS", "-m", str(timeout), "-o", "-", "-w", "\n%{http_code}", url]
        if data_file:
            argv[1:1] = ["--data-binary", f"@{data_file}", "-H", "Content-Type: application/octet-stream"]
        p = run(nsx(ns, *argv), check=False, timeout=timeout + 5)
        if p.returncode != 0:
            if check:
                raise LabError(f"curl {url} from {ns}: {p.stderr.strip()}")
            return 0, p.stderr.strip()
        body, _, code = p.stdout.rpartition("\n")
        return int(code or 0), body

    # -- pods ---------------------------------------------------------------------------------

    def runtime(self, node):
        d = self.s.path_of(node)
        os.makedirs(self.logs, exist_ok=True)
        f = open(os.path.join(self.logs, f"cni-{node}.jsonl"), "a")
        return cnirt.Runtime(self.s.ns(node), [os.path.join(d, "bin"), "/usr/lib/cni"],
                             self.s.path_of("cni-cache"), log=f)

    def add_pod(self, spec):
        node = spec["node"]
        uid = str(uuid.uuid4())
        cid = secrets.token_hex(32)
        netns = self.s.ns(f"pod-{spec['name']}")
        p = {"name": spec["name"], "namespace": spec["namespace"], "nodeName": node, "uid": uid, "cid": cid,
             "netns": netns, "sa": spec["sa"], "labels": spec["labels"], "app": spec["app"], "phase": "Pending"}
        self.s.d["pods"][spec["name"]] = p
        self.s.save()
        # The API objects first (as the API server has them before the kubelet's CNI ADD).
        self.write_cluster()
        self.add_netns(f"pod-{spec['name']}", dns_namespace=spec["namespace"])
        args = (f"IgnoreUnknown=1;K8S_POD_NAMESPACE={spec['namespace']};K8S_POD_NAME={spec['name']};"
                f"K8S_POD_INFRA_CONTAINER_ID={cid};K8S_POD_UID={uid}")
        rt = self.runtime(node)
        d = self.s.path_of(node)
        with open(os.path.join(d, "loopback.conflist")) as f:
            lo = json.load(f)
        rt.add(lo, cid, f"/run/netns/{netns}", "lo", args)
        p["cni"] = ["lo"]
        self.s.save()
        t0 = time.monotonic()
        for attempt in range(1, 6):
            with open(os.path.join(d, "net.d", "10-podnet.conflist")) as f:
                conflist = json.load(f)
            p["cni"] = ["lo", "eth0"]
            self.s.save()
            try:
                result = rt.add(conflist, cid, f"/run/netns/{netns}", "eth0", args)
                break
            except cnirt.CniError as e:
                # Like the kubelet: tear the sandbox's network down and retry (code 11 = try again).
                try:
                    rt.delete(conflist, cid, f"/run/netns/{netns}", "eth0", args)
                except cnirt.CniError:
                    pass
                if e.code != 11 or attempt == 5:
                    raise LabError(f"CNI ADD for {spec['namespace']}/{spec['name']}: {e}")
                log(f"    CNI ADD attempt {attempt}: {e.msg} (code 11: retrying)")
                time.sleep(1)
        p["cni_ms"] = int((time.monotonic() - t0) * 1000)
        p["chain"] = [pl["type"] for pl in conflist["plugins"]]
        ip = result["ips"][0]["address"].split("/")[0]
        p.update(ip=ip, phase="Running")
        self.s.save()
        self.write_cluster()
        if spec["app"] == "httpbin":
            self.spawn(f"app-{spec['name']}", netns, [sys.executable, os.path.join(HERE, "apps", "httpbin.py"),
                                                     str(APP_PORT), spec["name"], str(GRPC_PORT)], {})
        elif spec["app"] == "waypoint":
            # The environment istiod-lite's waypoint Deployment sets (istiod-lite/src/deploy/render.rs).
            self.spawn("waypoint", netns, [os.path.join(BIN, "waypoint")], {
                "XDS_ADDRESS": f"https://{ISTIOD_IP}:15012", "CA_ADDRESS": f"https://{ISTIOD_IP}:15012",
                "ALT_XDS_HOSTNAME": "istiod.istio-system.svc",
                "XDS_ROOT_CA": self.s.path_of("ca", "root-cert.pem"),
                "CA_ROOT_CA": self.s.path_of("ca", "root-cert.pem"),
                "AUTH_TOKEN_PATH": self.s.path_of("waypoint-token"),
                "TRUST_DOMAIN": TRUST_DOMAIN, "CLUSTER_ID": "Kubernetes",
                "POD_NAME": spec["name"], "POD_NAMESPACE": spec["namespace"], "INSTANCE_IP": ip,
                "SERVICE_ACCOUNT": spec["sa"], "NODE_NAME": spec["node"], "GATEWAY_NAME": "waypoint",
                # One worker (the benchmark's setting): the lab exercises the single-thread runtime.
                "WORKER_THREADS": "1", "RUST_LOG": "info",
            })
        else:
            self.spawn(f"app-{spec['name']}", netns, ["sleep", "infinity"], {})
        return p

    def kube_proxy(self, backend_ip):
        rules = ("*nat\n:LAB-SERVICES - [0:0]\n-A PREROUTING -j LAB-SERVICES\n-A OUTPUT -j LAB-SERVICES\n"
                 f"-A LAB-SERVICES -d {VIP}/32 -p tcp --dport {VIP_PORT} -j DNAT --to-destination {backend_ip}:{APP_PORT}\n"
                 "COMMIT\n")
        for n in (1, 2):
            run(nsx(self.s.ns(f"node{n}"), "iptables-restore", "--noflush"), input=rules)

    # -- bring-up ------------------------------------------------------------------------------

    def up(self, say):
        say("Cluster: a router netns and two node netns", [
            f"router {self.s.ns('rtr')}: 10.100.1.1, 10.100.2.1, istiod at {ISTIOD_IP}; no default route",
            f"nodes {self.s.ns('node1')} (10.100.1.2, pods 10.244.1.0/24) and {self.s.ns('node2')} (10.100.2.2, pods 10.244.2.0/24)"])
        self.build_topology()
        self.write_static_manifests()
        self.write_cluster()

        say("Control plane: istiod-lite (manifest directory, static node tokens, its own CA)", [])
        self.start_istiod()
        log(f"    xDS + CA on {ISTIOD_IP}:15012 (TLS, name istiod.istio-system.svc), root {self.s.path_of('ca', 'root-cert.pem')}")
        log(f"    manifests: {self.s.path_of('manifests')}")

        say("Per node: the node agent (mesh-cni-agent) and ztunnel (PROXY_MODE=shared)", [])
        for n in (1, 2):
            self.start_node(n)
        for n in (1, 2):
            wait_for(f"ztunnel on node{n} ready (xDS from istiod-lite, ZDS snapshot from the agent)",
                     lambda n=n: self.ztunnel_ready(n), 60)
            with open(self.s.path_of(f"node{n}", "net.d", "10-podnet.conflist")) as f:
                chain = [p["type"] for p in json.load(f)["plugins"]]
            log(f"    node{n}: agent chained its plugin: podnet = {' -> '.join(chain)}; ztunnel connected over ZDS and ready")

        say("Pods, created the kubelet's way: API object first, then CNI ADD (loopback; bridge+host-local -> portmap -> mesh-cni)", [])
        for spec in PODS:
            p = self.add_pod(spec)
            amb = NAMESPACES[p["namespace"]].get("istio.io/dataplane-mode") == "ambient"
            log(f"    {p['namespace'] + '/' + p['name']:<14} on {p['nodeName']}  ip {p['ip']:<11} sa {p['sa']:<8} "
                f"{'ambient' if amb else 'not in the mesh'}  (CNI ADD {p['cni_ms']} ms)")
        self.kube_proxy(self.s.d["pods"]["httpbin"]["ip"])
        log(f"    kube-proxy stand-in: DNAT {VIP}:{VIP_PORT} -> httpbin {self.s.d['pods']['httpbin']['ip']}:{APP_PORT} in both nodes (PREROUTING, OUTPUT)")
        for n in (1, 2):
            wait_for(f"ztunnel on node{n} to know every pod and the Service (xDS)",
                     lambda n=n: self.ztunnel_ready(n) and self.ztunnel_knows(n), 60)
        pods = self.s.d["pods"]
        wait_for("httpbin listening", lambda: self.http(self.s.ns("node2"), f"http://{pods['httpbin']['ip']}:{APP_PORT}/healthz", check=False)[0] == 200, 20)
        self.s.d["up"] = True
        self.s.save()

    # -- inspection -----------------------------------------------------------------------------

    def annotation(self, pod):
        p = self.s.d["pods"][pod]
        try:
            with open(self.s.path_of("cluster", "annotations", f"{p['namespace']}.{p['name']}.yaml")) as f:
                return f.read().strip()
        except OSError:
            return ""

    def listeners(self, pod):
        p = run(nsx(self.s.d["pods"][pod]["netns"], "ss", "-Hltn"), check=False)
        return sorted({l.split()[3].rsplit(":", 1)[1] for l in p.stdout.splitlines() if len(l.split()) > 3}, key=int)

    def access_lines(self, node, since=0):
        with open(self.proc(f"ztunnel-{node}")["log"], errors="replace") as f:
            f.seek(since)
            return [l.rstrip() for l in f if " access" in l or "access:" in l]

    def log_size(self, node):
        return os.path.getsize(self.proc(f"ztunnel-{node}")["log"])

    def counters(self):
        p = run(nsx(self.s.ns("rtr"), "iptables", "-L", "LAB-ACCT", "-v", "-n", "-x"))
        rows = [l.split() for l in p.stdout.splitlines()[2:] if l.strip()]
        return [(int(r[0]), int(r[1])) for r in rows]

    def zero_counters(self):
        run(nsx(self.s.ns("rtr"), "iptables", "-Z", "LAB-ACCT"))

    # -- teardown -----------------------------------------------------------------------------

    def down(self):
        errors = []
        procs = list(reversed(self.s.d["procs"]))
        for pr in procs:
            if proc_alive(pr["pid"]) and proc_matches(pr["pid"], pr["exe"]):
                try:
                    os.kill(pr["pid"], signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 8
        for pr in procs:
            while proc_alive(pr["pid"]) and time.monotonic() < deadline:
                ch = self.children.get(pr["pid"])
                if ch is not None and ch.poll() is not None:
                    break
                time.sleep(0.05)
            if proc_alive(pr["pid"]) and proc_matches(pr["pid"], pr["exe"]):
                errors.append(f"{pr['name']} (pid {pr['pid']}) ignored SIGTERM; killed")
                try:
                    os.kill(pr["pid"], signal.SIGKILL)
                except ProcessLookupError:
                    pass
            ch = self.children.get(pr["pid"])
            if ch is not None:
                try:
                    ch.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    errors.append(f"{pr['name']} (pid {pr['pid']}) did not exit")
        # CNI DEL for every pod that got an ADD, in reverse (the kubelet's teardown).
        for p in reversed(list(self.s.d["pods"].values())):
            node = p["nodeName"]
            if self.s.ns(node) not in existing_netns():
                continue
            rt = self.runtime(node)
            args = (f"IgnoreUnknown=1;K8S_POD_NAMESPACE={p['namespace']};K8S_POD_NAME={p['name']};"
                    f"K8S_POD_INFRA_CONTAINER_ID={p['cid']};K8S_POD_UID={p['uid']}")
            for ifname in reversed(p.get("cni", [])):
                conf = os.path.join(self.s.path_of(node), "net.d/10-podnet.conflist" if ifname == "eth0" else "loopback.conflist")
                try:
                    with open(conf) as f:
                        rt.delete(json.load(f), p["cid"], f"/run/netns/{p['netns']}", ifname, args)
                except (OSError, ValueError, cnirt.CniError, subprocess.TimeoutExpired) as e:
                    errors.append(f"CNI DEL {p['name']}/{ifname}: {e}")
        present = existing_netns()
        for ns in reversed(self.s.d["netns"]):
            if ns in present:
                p = run(["ip", "netns", "del", ns], check=False)
                if p.returncode != 0:
                    errors.append(f"ip netns del {ns}: {p.stderr.strip()}")
        for d in self.s.d.get("etc_netns", []):
            # Only the directories this lab created, by name.
            try:
                os.unlink(os.path.join(d, "resolv.conf"))
                os.rmdir(d)
            except FileNotFoundError:
                pass
            except OSError as e:
                errors.append(f"removing {d}: {e}")
        return errors


def existing_netns():
    p = run(["ip", "netns", "list"], check=False)
    return {l.split()[0] for l in p.stdout.splitlines() if l.strip()}


def tail(path, n=15):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return "(no log)\n"


# ---------------------------------------------------------------------------------------------
# The walkthrough




def walkthrough(lab, say):
    s = lab.s
    pods = s.d["pods"]
    sleep, httpbin, legacy = pods["sleep"], pods["httpbin"], pods["legacy"]
    sid = f"spiffe://{TRUST_DOMAIN}/ns/demo/sa/sleep"
    hid = f"spiffe://{TRUST_DOMAIN}/ns/demo/sa/httpbin"

    say("Enrollment: the agent put the redirection rules into the ambient pods and handed their netns to ztunnel", [])
    for name in ("sleep", "httpbin", "legacy"):
        ann = lab.annotation(name).replace("\n", " ")
        log(f"    {pods[name]['namespace'] + '/' + name:<14} annotation: {ann or '(none)'}   listening in its netns: {', '.join(lab.listeners(name)) or '-'}")
    check("redirection: enabled" in lab.annotation("sleep") and "redirection: enabled" in lab.annotation("httpbin"),
          "sleep and httpbin annotated ambient.istio.io/redirection: enabled")
    check({"15001", "15006", "15008"} <= set(lab.listeners("sleep")), "ztunnel's 15001/15006/15008 listen inside sleep's netns")
    check(not lab.annotation("legacy") and "15001" not in lab.listeners("legacy"), "legacy (namespace not ambient) untouched")

    say(f"Traffic: sleep (node1) -> httpbin Service VIP {VIP}:{VIP_PORT} and -> pod {httpbin['ip']}:{APP_PORT} (node2)", [
        f"$ ip netns exec {sleep['netns']} curl -s http://{VIP}:{VIP_PORT}/get"])
    pos = {n: lab.log_size(n) for n in ("node1", "node2")}
    lab.zero_counters()
    code, body = lab.http(sleep["netns"], f"http://{VIP}:{VIP_PORT}/get")
    log(f"    HTTP {code} {body.strip()}")
    check(code == 200 and json.loads(body)["client"].startswith(sleep["ip"] + ":"),
          "pod -> Service VIP answered; httpbin saw sleep's own IP (source preserved)")
    code, body = lab.http(sleep["netns"], f"http://{httpbin['ip']}:{APP_PORT}/get")
    log(f"    HTTP {code} {body.strip()}")
    check(code == 200, "pod -> pod answered")

    say("DNS: sleep's queries to its cluster DNS are captured and answered by ztunnel's DNS proxy (localhost:15053 in the pod)", [
        f"$ ip netns exec {sleep['netns']} curl -s http://httpbin:{VIP_PORT}/get     (resolv.conf: nameserver {CLUSTER_DNS}, search demo.svc.cluster.local ...)"])
    for host in ("httpbin", "httpbin.demo", "httpbin.demo.svc.cluster.local"):
        code, body = lab.http(sleep["netns"], f"http://{host}:{VIP_PORT}/get", check=False)
        log(f"    {host}: HTTP {code}")
        check(code == 200, f"{host} resolved to the Service VIP by ztunnel and answered")
    payload = s.path_of("payload.bin")
    with open(payload, "w") as f:
        f.write((MARKER + "x" * 200 + "\n") * 1200)
    size = os.path.getsize(payload)
    code, body = lab.http(sleep["netns"], f"http://{VIP}:{VIP_PORT}/post", data_file=payload)
    check(code == 200 and json.loads(body)["bytes_received"] == size, f"POST of {size} bytes with a plaintext marker arrived whole")

    say("Access log: one line per connection, both SPIFFE identities (ztunnel on node1 = outbound, node2 = inbound)", [])
    time.sleep(0.5)
    out_lines = wait_for("access-log lines on node1", lambda: lab.access_lines("node1", pos["node1"]), 10)
    in_lines = wait_for("access-log lines on node2", lambda: lab.access_lines("node2", pos["node2"]), 10)
    show_access("node1", out_lines[0])
    show_access("node2", in_lines[0])
    log("    node2's line as logged:")
    log("      " + in_lines[0][in_lines[0].find("access:"):])
    both = [l for l in out_lines + in_lines if sid in l and hid in l]
    check(len(both) >= 2, f"access lines carry src {sid} and dst {hid}")

    say("Between the nodes only TLS to :15008 crossed (iptables counters on the router's FORWARD)", [])
    c = lab.counters()
    log(f"    marker in plaintext: {c[0][0]} pkts | to :15008: {c[1][0]} pkts {c[1][1]} bytes | from :15008: {c[2][0]} pkts | anything else: {c[3][0]} pkts")
    check(c[0][0] == 0, "the marker never crossed in plaintext")
    check(c[1][1] > size, f"more than the {size} bytes went to :15008 (the HBONE tunnel)")
    check(c[3][0] == 0, "no other pod-to-pod traffic crossed")
    lab.zero_counters()
    pos2 = lab.log_size("node2")
    code, body = lab.http(legacy["netns"], f"http://{VIP}:{VIP_PORT}/post", data_file=payload)
    c = lab.counters()
    log(f"    positive control, legacy (not in the mesh) -> {VIP}:{VIP_PORT}: HTTP {code}; marker in plaintext: {c[0][0]} pkts, other: {c[3][0]} pkts")
    check(code == 200 and c[0][0] > 0, "the same payload from a pod outside the mesh is seen in plaintext (the match works)")
    plain = wait_for("node2's plaintext inbound access line", lambda: lab.access_lines("node2", pos2), 10)
    show_access("node2", plain[0])
    check("src.identity" not in short_access(plain[0]) and hid in plain[0],
          "httpbin's ztunnel captured it on :15006: no client identity, destination identity httpbin")

    say("Kubelet-style probe from node2's netns: SNATed to 169.254.7.127 by the agent's host rule, not captured", [
        f"$ ip netns exec {s.ns('node2')} curl -s http://{httpbin['ip']}:{APP_PORT}/healthz"])
    code, body = lab.http(s.ns("node2"), f"http://{httpbin['ip']}:{APP_PORT}/healthz")
    log(f"    HTTP {code} {body.strip()}")
    check(code == 200 and json.loads(body)["client"].startswith("169.254.7.127:"), "the probe reached the app directly from 169.254.7.127")

    say("AuthorizationPolicy demo/deny-sleep (namespace demo): DENY principal cluster.local/ns/demo/sa/sleep", [
        f"written to {s.path_of('manifests', 'policy-deny-sleep.yaml')}; istiod-lite pushes it over xDS"])
    write_atomic(s.path_of("manifests", "policy-deny-sleep.yaml"), POLICY)
    def attached():
        code, body = lab.http(s.ns("node2"), "http://127.0.0.1:15000/config_dump", check=False)
        st = json.loads(body)["state"] if code == 200 else {}
        return any(p.get("name") == "deny-sleep" for p in st.get("policies", []))
    wait_for("node2's ztunnel to hold the policy", attached, 30)
    log("    node2's ztunnel holds it (admin /config_dump)")
    pos = lab.log_size("node2")
    code, body = lab.http(sleep["netns"], f"http://{VIP}:{VIP_PORT}/get", check=False)
    log(f"    sleep -> {VIP}:{VIP_PORT}: {('HTTP %d' % code) if code else 'refused: ' + body}")
    check(code == 0, "sleep is refused")
    denied = wait_for("the deny access line", lambda: [l for l in lab.access_lines("node2", pos) if "deny-sleep" in l], 10)
    show_access("node2", denied[0])
    check(sid in denied[0], "node2's access log names the policy demo/deny-sleep and the denied identity")
    code, body = lab.http(legacy["netns"], f"http://{VIP}:{VIP_PORT}/get", check=False)
    log(f"    legacy -> {VIP}:{VIP_PORT}: HTTP {code}")
    check(code == 200, "legacy still gets through: the policy names sleep's identity only")

    waypoint_scenarios.run_all(lab, say, sid, hid)


def print_explore(lab):
    s = lab.s
    log()
    log(bold("The lab is up. Explore:"))
    lp = os.path.relpath(os.path.join(HERE, "lab.py"), os.getcwd())
    for name, p in s.d["pods"].items():
        log(f"  {p['namespace'] + '/' + name:<14} {p['ip']:<11} on {p['nodeName']}:  ip netns exec {p['netns']} bash     (or: python3 {lp} exec {name} -- CMD)")
    log(f"  try:   ip netns exec {s.d['pods']['sleep']['netns']} curl -s http://{VIP}:{VIP_PORT}/get")
    for n in (1, 2):
        log(f"  node{n}:  ip netns exec {s.ns(f'node{n}')} bash   (ztunnel admin: curl -s 127.0.0.1:15000/config_dump, metrics :15020/metrics)")
    log(f"  router: ip netns exec {s.ns('rtr')} iptables -L LAB-ACCT -v -n -x      (istiod-lite: curl -s 127.0.0.1:15014/debug/snapshot)")
    log(f"  logs:   {lab.logs}/  ({', '.join(sorted(os.listdir(lab.logs)))})")
    log(f"  apply a policy: drop a YAML file into {s.path_of('manifests')}/")
    log(f"  state:  {s.path}")
    log("  stop:   make demo-down")


# ---------------------------------------------------------------------------------------------
# Commands


def with_signals(fn):
    def handler(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")
    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        return fn()
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def teardown(lab, keep_work):
    errors = lab.down()
    for e in errors:
        log(f"    teardown: {e}")
    left = [ns for ns in lab.s.d["netns"] if ns in existing_netns()]
    if left:
        log(f"    teardown: netns still present: {' '.join(left)}")
    try:
        if os.path.realpath(POINTER) == os.path.realpath(lab.s.path):
            os.unlink(POINTER)
    except OSError:
        pass
    if keep_work:
        log(f"    logs kept in {lab.logs}/")
    else:
        shutil.rmtree(lab.s.d["work"], ignore_errors=True)
    return not left


def dump_logs(lab):
    for pr in lab.s.d["procs"]:
        if pr["name"].startswith("app-"):
            continue
        log(f"--- {pr['name']} (pid {pr['pid']}, {'running' if proc_alive(pr['pid']) else 'exited'}): last lines of {pr['log']}")
        sys.stdout.write(tail(pr["log"], 12))
    sys.stdout.flush()


def cmd_demo(args):
    ensure_deps(install=not args.no_install)
    say = Steps()
    state = State.new()
    lab = Lab(state)
    ok = False

    def body():
        nonlocal ok
        log(bold(f"mesh lab demo: prefix {state.d['prefix']}, work dir {state.d['work']}"))
        lab.up(say)
        walkthrough(lab, say)
        ok = True

    try:
        with_signals(body)
    except (LabError, cnirt.CniError, subprocess.TimeoutExpired, KeyboardInterrupt) as e:
        log()
        log(bold(f"FAILED: {e}"))
        dump_logs(lab)
    finally:
        say("Teardown: processes by PID, CNI DEL per pod, namespaces by name", [])
        clean = with_signals(lambda: teardown(lab, keep_work=not ok or args.keep_logs))
        log(f"    nothing of {state.d['prefix']} left" if clean else f"    NOT clean: see above ({state.d['prefix']})")
    log()
    if ok:
        log(bold(f"demo passed in {time.monotonic() - say.t0:.0f}s"))
        return 0
    return 1


def cmd_up(args):
    ensure_deps(install=not args.no_install)
    if os.path.exists(POINTER):
        raise LabError(f"a lab is already up (state {os.path.realpath(POINTER)}); `make demo-down` first")
    say = Steps()
    state = State.new()
    lab = Lab(state)
    try:
        with_signals(lambda: lab.up(say))
    except (LabError, cnirt.CniError, subprocess.TimeoutExpired, KeyboardInterrupt) as e:
        log(bold(f"FAILED: {e}"))
        dump_logs(lab)
        teardown(lab, keep_work=True)
        return 1
    os.makedirs(POINTER_DIR, exist_ok=True)
    os.symlink(state.path, POINTER)
    print_explore(lab)
    return 0


def load_state(path):
    path = path or POINTER
    if not os.path.exists(path):
        raise LabError(f"no lab state at {path} (is a lab up? `make demo-up`)")
    return State.load(os.path.realpath(path))


def cmd_down(args):
    try:
        state = load_state(args.state)
    except LabError as e:
        log(str(e))
        return 0
    lab = Lab(state)
    log(f"tearing down {state.d['prefix']} ({state.path})")
    clean = with_signals(lambda: teardown(lab, keep_work=args.keep_logs))
    log("clean" if clean else "NOT clean (see above)")
    return 0 if clean else 1


def cmd_exec(args):
    state = load_state(args.state)
    p = state.d["pods"].get(args.pod)
    ns = p["netns"] if p else (state.ns(args.pod) if state.ns(args.pod) in state.d["netns"] else None)
    if ns is None:
        raise LabError(f"no pod or netns {args.pod!r}; pods: {', '.join(state.d['pods'])}; netns: rtr, node1, node2")
    cmd = args.cmd[1:] if args.cmd and args.cmd[0] == "--" else args.cmd
    os.execvp("ip", nsx(ns, *(cmd or ["bash"])))


def cmd_status(args):
    state = load_state(args.state)
    lab = Lab(state)
    for pr in state.d["procs"]:
        log(f"  {pr['name']:<16} pid {pr['pid']:<8} {'running' if proc_alive(pr['pid']) else 'EXITED '}  {pr['log']}")
    for name, p in state.d["pods"].items():
        log(f"  pod {p['namespace']}/{name} {p.get('ip')} on {p['nodeName']} netns {p['netns']}")
    log(f"  netns: {' '.join(state.d['netns'])}")
    del lab
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo")
    d.add_argument("--keep-logs", action="store_true", help="keep the work dir (logs) after a passing run")
    d.add_argument("--no-install", action="store_true")
    u = sub.add_parser("up")
    u.add_argument("--no-install", action="store_true")
    dn = sub.add_parser("down")
    dn.add_argument("state", nargs="?")
    dn.add_argument("--keep-logs", action="store_true")
    e = sub.add_parser("exec")
    e.add_argument("pod")
    e.add_argument("cmd", nargs=argparse.REMAINDER)
    e.add_argument("--state")
    st = sub.add_parser("status")
    st.add_argument("--state")
    dp = sub.add_parser("deps")
    dp.add_argument("--check", action="store_true", help="only report, do not install")
    a = ap.parse_args()
    try:
        if a.command == "deps":
            need = missing_deps()
            if a.check:
                log("missing: " + (" ".join(need) or "nothing"))
                return 1 if need else 0
            ensure_deps(binaries=False)
            log("lab dependencies present")
            return 0
        return {"demo": cmd_demo, "up": cmd_up, "down": cmd_down, "exec": cmd_exec, "status": cmd_status}[a.command](a)
    except LabError as e:
        log(f"lab: {e}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
