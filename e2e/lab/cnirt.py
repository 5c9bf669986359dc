"""A small CNI runtime that follows the CNI spec (1.0): what containerd's CRI plugin does
with libcni, minus the containers.

- The request for each plugin is its conflist entry plus the list's `name` and
  `cniVersion`; `capabilities` is removed and replaced by `runtimeConfig` holding only the
  capabilities the plugin declares (e.g. portmap's `portMappings`).
- ADD runs the plugins in list order; each plugin's result is the next one's `prevResult`.
  The final result is cached (with the config it came from) for CHECK and DEL.
- DEL runs in reverse order with the cached result as every plugin's `prevResult`, and
  succeeds if there is nothing to delete. CHECK runs in order with the cached result,
  unless the list says `disableCheck`.
- Plugins are executed inside the node's netns (`ip netns exec NODE`), so bridges, veths,
  iptables chains and sysctls land there and never in the machine's root netns.

Usable as a module (`Runtime`) or a command:
  python3 cnirt.py ADD|CHECK|DEL NODE_NETNS CONFLIST CONTAINER_ID NETNS_PATH IFNAME CNI_ARGS [RUNTIME_CONFIG_JSON]
with CNI_PATH (':'-separated) and CNI_CACHE_DIR in the environment.
"""

import json
import os
import subprocess
import sys


class CniError(Exception):
    def __init__(self, plugin, command, code, msg, details=""):
        self.plugin, self.command, self.code, self.msg = plugin, command, code, msg
        super().__init__(
            f"CNI {command} failed in plugin {plugin!r}: code {code}: {msg}"
            + (f" ({details})" if details else "")
        )


class Runtime:
    def __init__(self, node_netns, cni_path, cache_dir, log=None):
        self.node_netns = node_netns
        self.cni_path = [p for p in cni_path if p]
        self.cache_dir = cache_dir
        self.log = log  # optional file object: every request/response is appended
        os.makedirs(cache_dir, exist_ok=True)

    def _find(self, ptype):
        for d in self.cni_path:
            p = os.path.join(d, ptype)
            if os.access(p, os.X_OK):
                return p
        raise CniError(ptype, "find", 50, f"plugin binary {ptype!r} not in CNI_PATH {':'.join(self.cni_path)}")

    @staticmethod
    def request(conflist, plugin, runtime_config, prev):
        req = dict(plugin)
        req["name"] = conflist["name"]
        req["cniVersion"] = conflist["cniVersion"]
        caps = req.pop("capabilities", {}) or {}
        rc = {k: v for k, v in (runtime_config or {}).items() if caps.get(k) is True}
        if rc:
            req["runtimeConfig"] = rc
        if prev is not None:
            req["prevResult"] = prev
        return req

    def _exec(self, command, plugin_type, req, cid, netns, ifname, args):
        env = {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": cid,
            "CNI_IFNAME": ifname,
            "CNI_ARGS": args,
            "CNI_PATH": ":".join(self.cni_path),
        }
        if netns:
            env["CNI_NETNS"] = netns
        binary = self._find(plugin_type)
        body = json.dumps(req).encode()
        p = subprocess.run(
            ["ip", "netns", "exec", self.node_netns, binary],
            input=body, env=env, capture_output=True, timeout=60,
        )
        out = p.stdout.decode(errors="replace").strip()
        if self.log:
            self.log.write(json.dumps({"command": command, "plugin": plugin_type, "ifname": ifname,
                                       "request": req, "rc": p.returncode, "stdout": out,
                                       "stderr": p.stderr.decode(errors="replace")}) + "\n")
            self.log.flush()
        if p.returncode != 0:
            try:
                e = json.loads(out)
                raise CniError(plugin_type, command, e.get("code", -1), e.get("msg", out), e.get("details", ""))
            except ValueError:
                raise CniError(plugin_type, command, -1, out or p.stderr.decode(errors="replace").strip())
        if command == "ADD":
            try:
                return json.loads(out)
            except ValueError:
                raise CniError(plugin_type, command, 6, f"result is not JSON: {out!r}")
        return None

    def _cache_file(self, conflist, cid, ifname):
        return os.path.join(self.cache_dir, f"{conflist['name']}-{cid}-{ifname}.json")

    def add(self, conflist, cid, netns, ifname, args, runtime_config=None):
        prev = None
        for plugin in conflist["plugins"]:
            req = self.request(conflist, plugin, runtime_config, prev)
            prev = self._exec("ADD", plugin["type"], req, cid, netns, ifname, args)
        with open(self._cache_file(conflist, cid, ifname), "w") as f:
            json.dump({"result": prev, "config": conflist, "runtimeConfig": runtime_config or {},
                       "netns": netns, "args": args}, f)
        return prev

    def check(self, conflist, cid, netns, ifname, args):
        if conflist.get("disableCheck"):
            return
        cached = self._load(conflist, cid, ifname)
        if cached is None:
            raise CniError("-", "CHECK", 3, f"no cached result for {cid}/{ifname}")
        for plugin in conflist["plugins"]:
            req = self.request(conflist, plugin, cached["runtimeConfig"], cached["result"])
            self._exec("CHECK", plugin["type"], req, cid, netns, ifname, args)

    def _load(self, conflist, cid, ifname):
        try:
            with open(self._cache_file(conflist, cid, ifname)) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def delete(self, conflist, cid, netns, ifname, args):
        """DEL with the cached config (what ADD actually ran) when there is one."""
        cached = self._load(conflist, cid, ifname)
        used = cached["config"] if cached else conflist
        prev = cached["result"] if cached else None
        rc = cached["runtimeConfig"] if cached else {}
        errors = []
        for plugin in reversed(used["plugins"]):
            req = self.request(used, plugin, rc, prev)
            try:
                self._exec("DEL", plugin["type"], req, cid, netns, ifname, args)
            except (CniError, subprocess.TimeoutExpired) as e:
                errors.append(str(e))
        if errors:
            raise CniError("-", "DEL", -1, "; ".join(errors))
        try:
            os.unlink(self._cache_file(used, cid, ifname))
        except FileNotFoundError:
            pass


def main(argv):
    if len(argv) < 8:
        print(__doc__, file=sys.stderr)
        return 2
    cmd, node, conflist_path, cid, netns, ifname, args = argv[1:8]
    rc = json.loads(argv[8]) if len(argv) > 8 else {}
    with open(conflist_path) as f:
        conflist = json.load(f)
    rt = Runtime(node, os.environ.get("CNI_PATH", "/usr/lib/cni").split(":"),
                 os.environ.get("CNI_CACHE_DIR", "/tmp/cni-cache"))
    try:
        if cmd == "ADD":
            print(json.dumps(rt.add(conflist, cid, netns, ifname, args, rc)))
        elif cmd == "CHECK":
            rt.check(conflist, cid, netns, ifname, args)
        elif cmd == "DEL":
            rt.delete(conflist, cid, netns, ifname, args)
        else:
            print(f"unknown command {cmd}", file=sys.stderr)
            return 2
    except CniError as e:
        print(e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
