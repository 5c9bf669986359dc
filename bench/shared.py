"""The in-pod shared-mode SUT (performance.md §4.2, phase 2): one ztunnel per node, in the
node's namespace, serving the pods its node agent hands it over ZDS.

    cli ── nodea ── nodeb ── srv
           agent+ztunnel  agent+ztunnel

Per node, `mesh-cni-agent` (files pod source: one ambient pod) and `ztunnel`
(`PROXY_MODE=shared`, `INPOD_UDS` = the agent's ZDS socket) run in the node namespace. The
agent finds the pod's network namespace the way it finds pods that were already running
when it started: by scanning a proc root for the pod UID in a cgroup path (here a
directory of this run's work dir holding one `<pid>/cgroup` and a `<pid>/ns/net` link to
the pod's `/run/netns` file), and accepts it only because the pod's IP is local there.
Then the path is the production one:
- the agent installs the in-pod redirection rules in the pod;
- it hands the netns to ztunnel over ZDS;
- ztunnel opens its 15001/15006/15008 listeners inside the pod.
"""

import json
import os
import subprocess
import uuid

from benchlib import CLI_IP, PROXY_CPU, SRV_IP, Sut, log, wait_http, wait_until

NODES = (("na", "node-a", "cli", CLI_IP), ("nb", "node-b", "srv", SRV_IP))


class ZtunnelShared(Sut):
    def __init__(self, lab, work, ztunnel_bin, agent_bin, workers, name="ours_shared"):
        super().__init__(lab, work)
        self.zt, self.agent, self.workers, self.name = ztunnel_bin, agent_bin, workers, name
        self.ztunnels = []

    def _node_dir(self, node):
        return self.work / f"shared-{node}"

    def start(self):
        for node_ns, node, pod, ip in NODES:
            d = self._node_dir(node_ns)
            (d / "src" / "annotations").mkdir(parents=True, exist_ok=True)
            (d / "proc" / "1" / "ns").mkdir(parents=True, exist_ok=True)
            uid = str(uuid.uuid4())
            (d / "proc" / "1" / "cgroup").write_text(
                f"0::/kubepods.slice/kubepods-besteffort.slice/"
                f"kubepods-besteffort-pod{uid.replace('-', '_')}.slice/cri-containerd-0.scope\n")
            link = d / "proc" / "1" / "ns" / "net"
            if link.is_symlink():
                link.unlink()
            link.symlink_to(f"/run/netns/{self.lab.ns[pod]}")
            for f in (d / "src" / "annotations").iterdir():
                f.unlink()
            cluster = {
                "namespaces": [{"name": "bench",
                                "labels": {"istio.io/dataplane-mode": "ambient"}}],
                "pods": [{"uid": uid, "name": pod, "namespace": "bench", "nodeName": node,
                          "podIPs": [ip], "serviceAccountName": pod, "phase": "Running"}],
            }
            # YAML is a superset of JSON; the file is written whole before the agent starts.
            (d / "src" / "cluster.yaml").write_text(json.dumps(cluster))
            sock = d / "ztunnel.sock"
            env = dict(os.environ)
            env.update({
                "NODE_NAME": node, "ZTUNNEL_UDS": str(sock),
                "CNI_AGENT_SOCKET": str(d / "cni.sock"), "POD_SOURCE": "files",
                "POD_SOURCE_DIR": str(d / "src"),
                "HOST_NETNS": f"/run/netns/{self.lab.ns[node_ns]}",
                "PROC_ROOT": str(d / "proc"), "AMBIENT_DNS_CAPTURE": "false",
                "AMBIENT_IPV6": "false", "CHAINED_CNI_PLUGIN": "false",
                "CNI_BIN_DIR": str(d / "bin"), "CNI_CONF_DIR": str(d / "net.d"),
                "RESYNC_INTERVAL": "1s", "RUST_LOG": "warn",
            })
            self.procs.append(self.lab.spawn(node_ns, [self.agent], cpu=PROXY_CPU, env=env))
            zenv = dict(os.environ)
            zenv.update({
                "PROXY_MODE": "shared", "INPOD_UDS": str(sock),
                "LOCAL_XDS_PATH": str(self.work / "local.yaml"),
                "LOCAL_CA_DIR": str(self.work / "ca"), "NODE_NAME": node, "RUST_LOG": "warn",
                "WORKER_THREADS": str(self.workers),
            })
            self.ztunnels.append(self.lab.spawn(node_ns, [self.zt], cpu=PROXY_CPU, env=zenv))
            self.procs.append(self.ztunnels[-1])
        for node_ns, _, pod, _ in NODES:
            wait_http(self.lab, node_ns, "http://127.0.0.1:15021/healthz/ready",
                      f"{self.name} ztunnel in {node_ns}")
            note = self._node_dir(node_ns) / "src" / "annotations" / f"bench.{pod}.yaml"
            wait_until(self.lab, node_ns, ["grep", "-q", "enabled", str(note)],
                       f"{self.name}: the agent enrolling pod {pod}")
            # Enrolled: the redirection is in the pod and ztunnel listens inside it.
            wait_until(self.lab, pod, ["sh", "-c", "ss -ltn | grep -q ':15008 '"],
                       f"{self.name}: ztunnel's listeners in pod {pod}")

    def stop(self):
        # Leave the pods as the other SUTs need them: take the namespace out of the mesh, so
        # the agent removes its rules from the pods (as on `istio.io/dataplane-mode`
        # removal), then stop the processes, then drop whatever is left in the pods' nat and
        # mangle tables (namespaces this run created).
        for node_ns, _, pod, _ in NODES:
            src = self._node_dir(node_ns) / "src" / "cluster.yaml"
            if not src.exists():
                continue
            cluster = json.loads(src.read_text())
            cluster["namespaces"][0]["labels"] = {}
            tmp = src.with_suffix(".tmp")
            tmp.write_text(json.dumps(cluster))
            tmp.rename(src)
        for node_ns, _, pod, _ in NODES:
            try:
                wait_until(self.lab, pod, ["sh", "-c", "! iptables-save | grep -q ISTIO"],
                           f"{self.name}: the agent removing its rules from pod {pod}", 10)
            except RuntimeError as e:
                log(f"{e}; flushing them")
        super().stop()
        self.ztunnels = []
        for _, _, pod, _ in NODES:
            for table in ("nat", "mangle"):
                for op in ("-F", "-X"):
                    subprocess.run(["ip", "netns", "exec", self.lab.ns[pod], "iptables", "-t",
                                    table, op], stderr=subprocess.DEVNULL)

    def admin_namespaces(self):
        return [node_ns for node_ns, _, _, _ in NODES]

    def proxy_pids(self):
        # The ztunnels. The agents resync every second (RESYNC_INTERVAL) but do no data-path
        # work; their CPU is in the system-wide numbers.
        return [p.pid for p in self.ztunnels]
