"""The waypoint's part of the lab walkthrough (issue 7 §5): the scenarios of
waypoint/tests/direct.rs, run through the real data path, sleep (node1) -> node1's ztunnel ->
HBONE -> the waypoint pod (node2) -> HBONE -> the app pod's ztunnel -> the app, and configured
as a user would: YAML written into istiod-lite's manifest directory, pushed over xDS.

Each step waits until the waypoint's /config_dump holds exactly the objects it expects (so a
push that never arrives fails the step, and a stale one cannot make it pass), then checks
outcomes against the client's view (status codes), the apps' own counters (/_lab/stats, asked
from the node like a kubelet probe, outside the mesh) and the waypoint's access log.
"""

import base64
import hashlib
import hmac
import json
import math
import os
import sys
import time

from labutil import (APP_PORT, GRPC_PORT, TRUST_DOMAIN, VIP, VIP_PORT, GiveUp, LabError, check, fields, log, nsx, run,
                     show_access, wait_for, write_atomic)

HERE = os.path.dirname(os.path.abspath(__file__))

# The waypoint's pod, as istiod would deploy it for Gateway demo/waypoint (not captured).
WAYPOINT_POD = dict(name="waypoint", namespace="demo", node="node2", sa="waypoint",
                    labels={"gateway.networking.k8s.io/gateway-name": "waypoint", "istio.io/dataplane-mode": "none"},
                    app="waypoint")
# A second version of httpbin, on the other node, behind its own Service (route backends).
V2_POD = dict(name="httpbin-v2", namespace="demo", node="node1", sa="httpbin",
              labels={"app": "httpbin-v2", "version": "v2"}, app="httpbin")
V2_VIP = "10.96.0.21"

GW = "targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}]"
SVC = 'targetRefs: [{group: "", kind: Service, name: httpbin}]'
PARENT = 'parentRefs: [{group: "", kind: Service, name: httpbin, port: 8000}]'


def policy(name, action, target, rules):
    return (f"apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: demo}}\n"
            f"spec:\n  {target}\n  action: {action}\n  rules:\n{rules}")


# L7, enforced by the waypoint (targetRefs to its Gateway): no one may GET /admin.
DENY_ADMIN = policy("deny-admin", "DENY", GW, '  - to: [{operation: {paths: ["/admin*"]}}]\n')
ALLOW_PUBLIC = policy("allow-public", "ALLOW", SVC,
                      f'  - from: [{{source: {{principals: ["{TRUST_DOMAIN}/ns/demo/sa/sleep"]}}}}]\n'
                      '    to: [{operation: {methods: ["GET"], paths: ["/public/*"]}}]\n')
DENY_SECRET = policy("deny-grpc-secret", "DENY", GW, '  - to: [{operation: {paths: ["/lab.Echo/Secret"]}}]\n')
DENY_HEADER = policy("deny-header", "DENY", GW, '  - when: [{key: "request.headers[x-lab-block]", values: ["yes"]}]\n')

ISSUER = "lab-issuer"
JWT_SECRET = b"lab-jwt-secret-0123456789abcdef!"


def b64u(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def jwt(sub, secret=JWT_SECRET, exp_in=600):
    """An HS256 JWT (python's stdlib has HMAC, not RSA; the waypoint's JWKS handling is the same)."""
    h = b64u(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "lab"}).encode())
    p = b64u(json.dumps({"iss": ISSUER, "sub": sub, "exp": int(time.time()) + exp_in}).encode())
    return f"{h}.{p}." + b64u(hmac.new(secret, f"{h}.{p}".encode(), hashlib.sha256).digest())


JWKS = json.dumps({"keys": [{"kty": "oct", "k": b64u(JWT_SECRET), "alg": "HS256", "kid": "lab"}]})
REQUEST_AUTHN = (f"apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: jwt-lab, namespace: demo}}\n"
                 f"spec:\n  {SVC}\n  jwtRules:\n  - issuer: {ISSUER}\n    jwks: '{JWKS}'\n")
REQUIRE_ALICE = policy("require-alice", "ALLOW", SVC, f'  - from: [{{source: {{requestPrincipals: ["{ISSUER}/alice"]}}}}]\n')

ROUTE_HEAD = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n"
TRAFFIC_ROUTE = ROUTE_HEAD + f"""metadata: {{name: httpbin-traffic, namespace: demo}}
spec:
  {PARENT}
  rules:
  - matches: [{{path: {{type: PathPrefix, value: /split}}}}]
    backendRefs: [{{name: httpbin, port: 8000, weight: 90}}, {{name: httpbin-v2, port: 8000, weight: 10}}]
  - matches: [{{path: {{type: PathPrefix, value: /slow}}}}]
    timeouts: {{request: 500ms}}
    backendRefs: [{{name: httpbin, port: 8000}}]
  - matches: [{{path: {{type: PathPrefix, value: /mirror}}}}]
    filters: [{{type: RequestMirror, requestMirror: {{backendRef: {{name: httpbin-v2, port: 8000}}}}}}]
    backendRefs: [{{name: httpbin, port: 8000}}]
  - backendRefs: [{{name: httpbin, port: 8000}}]
"""
# The local rate limit is our own route annotation (Istio would need an EnvoyFilter).
LIMITED_ROUTE = ROUTE_HEAD + f"""metadata:
  name: httpbin-limited
  namespace: demo
  annotations: {{waypoint.mesh.io/rate-limit-requests: "3", waypoint.mesh.io/rate-limit-interval: 60s}}
spec:
  {PARENT}
  rules:
  - matches: [{{path: {{type: PathPrefix, value: /limited}}}}]
    backendRefs: [{{name: httpbin, port: 8000}}]
"""
V2_SERVICE = json.dumps({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "httpbin-v2", "namespace": "demo"},
                         "spec": {"clusterIP": V2_VIP, "selector": {"app": "httpbin-v2"},
                                  "ports": [{"name": "http", "port": VIP_PORT, "targetPort": APP_PORT}]}})


class Reply:
    def __init__(self, code, version="", headers=None, body="", secs=0.0):
        self.code, self.version, self.headers, self.body, self.secs = code, version, headers or {}, body, secs

    def json(self):
        try:
            return json.loads(self.body)
        except ValueError:
            return {}


class Ctx:
    def __init__(self, lab, sid, hid):
        self.lab, self.s = lab, lab.s
        self.sid, self.hid = sid, hid
        self.wid = f"spiffe://{TRUST_DOMAIN}/ns/demo/sa/waypoint"
        self.sleep = self.s.d["pods"]["sleep"]

    # -- configuration ------------------------------------------------------------------------

    def apply(self, name, text):
        write_atomic(self.s.path_of("manifests", name), text)

    def delete(self, name):
        os.unlink(self.s.path_of("manifests", name))

    def dump(self):
        code, body = self.lab.http(self.wp["netns"], "http://127.0.0.1:15000/config_dump", check=False)
        if code != 200:
            raise LabError(f"waypoint /config_dump: HTTP {code}")
        return json.loads(body)

    def wait_config(self, policies, authn=(), routes=(), extra=None):
        """Until the waypoint holds exactly these demo/ objects (and has rejected none of ours)."""
        want = (sorted(f"demo/{p}" for p in policies), sorted(f"demo/{a}" for a in authn), sorted(f"demo/{r}" for r in routes))

        def ok():
            d = self.dump()
            mine = [r for r in d.get("rejected", []) if "demo/" in json.dumps(r)]
            if mine:
                raise GiveUp(f"the waypoint rejected {mine}")
            got = (sorted(d.get("authorizationPolicies", [])), sorted(d.get("requestAuthentications", [])),
                   sorted(r["name"] for r in d.get("routes", [])))
            return got == want and (extra is None or extra(d))
        t0 = time.monotonic()
        wait_for(f"the waypoint's config to be {want}", ok, 30)
        log(f"    the waypoint holds it after {time.monotonic() - t0:.1f}s (admin /config_dump): "
            f"policies {', '.join(want[0]) or '-'}; authn {', '.join(want[1]) or '-'}; routes {', '.join(want[2]) or '-'}")

    # -- traffic ------------------------------------------------------------------------------

    def curl(self, path, *args, timeout=5, show=True, note=""):
        """curl from sleep to the httpbin Service VIP (captured by sleep's ztunnel)."""
        url = f"http://{VIP}:{VIP_PORT}{path}"
        argv = ["curl", "-sS", "-m", str(timeout), "-i", "-w", "\n%{http_code} %{http_version} %{time_total}", *args, url]
        p = run(nsx(self.sleep["netns"], *argv), check=False, timeout=timeout + 5)
        if p.returncode != 0:
            r = Reply(0, body=p.stderr.strip())
        else:
            out, _, tail = p.stdout.rpartition("\n")
            code, version, secs = tail.split()
            head, _, body = out.partition("\n\n")
            headers = {}
            for line in head.split("\n")[1:]:
                k, _, v = line.partition(":")
                headers[k.strip().lower()] = v.strip()
            r = Reply(int(code), version, headers, body, float(secs))
        if show:
            method = next((args[i + 1] for i, a in enumerate(args[:-1]) if a == "-X"), "GET")
            status = f"HTTP/{r.version} {r.code}" if r.code else f"failed: {r.body}"
            body = r.body.strip().replace("\n", " ")
            log(f"    sleep -> {method} {path}{note}: {status}  {body[:110]}")
        return r

    def client(self, *argv, timeout=60):
        p = run(nsx(self.sleep["netns"], sys.executable, os.path.join(HERE, "apps", "client.py"), *argv), timeout=timeout)
        return json.loads(p.stdout)

    def stats(self, pod):
        """The app's own counters, asked from its node (SNATed like a kubelet probe, not captured)."""
        p = self.s.d["pods"][pod]
        code, body = self.lab.http(self.s.ns(p["nodeName"]), f"http://{p['ip']}:{APP_PORT}/_lab/stats")
        return json.loads(body)

    def hits(self, pod, key):
        return self.stats(pod)["hits"].get(key, 0)

    # -- the waypoint's access log --------------------------------------------------------------

    def wpos(self):
        return os.path.getsize(self.lab.proc("waypoint")["log"])

    def access(self, since, path, n=1):
        """The waypoint's access lines for requests to `path` since offset `since` (waits for n)."""
        def lines():
            with open(self.lab.proc("waypoint")["log"], errors="replace") as f:
                f.seek(since)
                got = [(l.strip(), fields(l)) for l in f if " access" in l and fields(l).get("path") == path]
            return got if len(got) >= n else None
        return wait_for(f"{n} waypoint access line(s) for {path}", lines, 10)

    @staticmethod
    def show_line(line, keys=("src_identity", "method", "path", "protocol", "status", "flags", "route", "policy",
                              "attempts", "upstream", "duration_ms")):
        f = line[1]
        log("    waypoint: " + "  ".join(f"{k}={f[k]}" for k in keys if f.get(k) not in (None, "", "-")))


def run_all(lab, say, sid, hid):
    c = Ctx(lab, sid, hid)
    deploy(c, say)
    authorization(c, say)
    jwt_auth(c, say)
    routes(c, say)
    weights(c, say)
    retries(c, say)
    timeout(c, say)
    mirror(c, say)
    rate_limit(c, say)
    h2(c, say)
    grpc(c, say)
    websocket(c, say)


def deploy(c, say):
    lab, s, sleep = c.lab, c.s, c.sleep
    say("Waypoint: Gateway demo/waypoint (class istio-waypoint), its pod on node2, httpbin's Service bound with istio.io/use-waypoint", [
        "policy-deny-sleep.yaml removed; an L7 policy demo/deny-admin (targetRefs: the Gateway) denies paths /admin*"])
    c.delete("policy-deny-sleep.yaml")
    wp = c.wp = lab.add_pod(WAYPOINT_POD)
    wait_for("the waypoint ready (config over xDS and its certificate from istiod-lite)",
             lambda: lab.check_alive("waypoint") or
             lab.http(wp["netns"], "http://127.0.0.1:15021/healthz/ready", check=False)[0] == 200, 60)
    log(f"    waypoint pod {wp['ip']} (not captured: istio.io/dataplane-mode=none), HBONE on :15008, identity {c.wid}")
    lab.write_static_manifests(waypoint_ip=wp["ip"])
    c.apply("policy-deny-admin.yaml", DENY_ADMIN)

    def via_waypoint():
        pos = lab.log_size("node1")
        code, _ = lab.http(sleep["netns"], f"http://{VIP}:{VIP_PORT}/get", check=False)
        if code != 200:
            return False
        time.sleep(0.3)
        return any(f'dst.hbone_addr="{wp["ip"]}:15008"' in l for l in lab.access_lines("node1", pos))
    wait_for("sleep's ztunnel to send httpbin's traffic to the waypoint", via_waypoint, 60)
    pos = {n: lab.log_size(n) for n in ("node1", "node2")}
    code, body = lab.http(sleep["netns"], f"http://{VIP}:{VIP_PORT}/get")
    log(f"    sleep -> {VIP}:{VIP_PORT}/get: HTTP {code} {body.strip()}")
    check(code == 200 and json.loads(body)["client"].startswith(wp["ip"] + ":"),
          "answered through the waypoint (httpbin sees the waypoint's address)")
    out = wait_for("node1's line", lambda: [l for l in lab.access_lines("node1", pos["node1"]) if "outbound" in l], 10)
    show_access("node1", out[0])
    # The waypoint keeps its upstream connection to httpbin open (pooled), so node2's access
    # line comes only when it closes; its metrics show the connection now.
    def last_hop():
        code, body = lab.http(s.ns("node2"), "http://127.0.0.1:15020/metrics", check=False)
        return [l for l in body.splitlines() if l.startswith("istio_tcp_connections_opened_total")
                and f'source_principal="{c.wid}"' in l and f'destination_principal="{c.hid}"' in l] if code == 200 else []
    hop = wait_for("node2's ztunnel to count a connection from the waypoint", last_hop, 10)
    log("    node2 metrics: " + hop[0][:200])
    check(bool(hop), "httpbin's ztunnel authenticated the waypoint, not sleep, on the last hop")
    c.wait_config(["deny-admin"])
    pos = c.wpos()
    r = c.curl("/admin/users")
    check(r.code == 403 and "RBAC: access denied" in r.body, "the waypoint denies /admin* with 403 RBAC: access denied")
    line = c.access(pos, "/admin/users")[0]
    c.show_line(line)
    check(line[1].get("policy") == "demo/deny-admin" and c.sid in line[0],
          "the waypoint's access log names demo/deny-admin and sleep's identity")


def authorization(c, say):
    say("L7 authorization by method, path and header (the waypoint enforces it; ztunnel cannot see HTTP)", [
        "policy-allow-public.yaml: ALLOW sleep's principal to GET /public/* (targetRefs: Service httpbin)",
        "policy-deny-header.yaml: DENY when request.headers[x-lab-block] == yes (targetRefs: the Gateway)"])
    c.apply("policy-allow-public.yaml", ALLOW_PUBLIC)
    c.apply("policy-deny-header.yaml", DENY_HEADER)
    c.wait_config(["deny-admin", "allow-public", "deny-header"])
    before = c.stats("httpbin")["hits"]
    pos = c.wpos()
    check(c.curl("/public/a").code == 200, "GET /public/a from sleep is allowed")
    r = c.curl("/public/a", "-X", "POST")
    check((r.code, r.body.strip()) == (403, "RBAC: access denied"), "POST /public/a: 403 (the ALLOW names GET only)")
    check(c.curl("/private").code == 403, "GET /private: 403 (no ALLOW rule matches the path)")
    r = c.curl("/public/a", "-H", "x-lab-block: yes", note=" (x-lab-block: yes)")
    check(r.code == 403, "GET /public/a with x-lab-block: yes: 403 (the DENY on the header wins over the ALLOW)")
    check(c.curl("/public/b").code == 200, "the next allowed request still passes")
    after = c.stats("httpbin")["hits"]
    seen = {k: after.get(k, 0) - before.get(k, 0) for k in ("GET /public/a", "POST /public/a", "GET /private", "GET /public/b")}
    log(f"    httpbin counted: {seen}")
    check(seen == {"GET /public/a": 1, "POST /public/a": 0, "GET /private": 0, "GET /public/b": 1},
          "httpbin saw only the two allowed requests")
    lines = c.access(pos, "/public/a", 3)
    for line in lines:
        c.show_line(line)
    blocked = [l for l in lines if l[1].get("status") == "403" and l[1].get("policy") == "demo/deny-header"]
    check(len(blocked) == 1, "the waypoint's access log names demo/deny-header for the blocked request")


def jwt_auth(c, say):
    say("JWT: RequestAuthentication with an inline JWKS, and an ALLOW on the request principal", [
        "policy-allow-public.yaml removed; requestauthn-jwt-lab.yaml (issuer lab-issuer, HS256 key inline) and",
        "policy-require-alice.yaml: ALLOW requestPrincipals lab-issuer/alice (both targetRefs: Service httpbin)"])
    c.delete("policy-allow-public.yaml")
    c.apply("requestauthn-jwt-lab.yaml", REQUEST_AUTHN)
    c.apply("policy-require-alice.yaml", REQUIRE_ALICE)
    c.wait_config(["deny-admin", "deny-header", "require-alice"], ["jwt-lab"])
    before = c.hits("httpbin", "GET /jwt/profile")
    r = c.curl("/jwt/profile", note=" (no token)")
    check((r.code, r.body.strip()) == (403, "RBAC: access denied"), "no token: authenticated as nobody, so the ALLOW denies (403)")
    r = c.curl("/jwt/profile", "-H", f"Authorization: Bearer {jwt('alice', b'some-other-key-0123456789abcdef')}",
               note=" (alice, signed with another key)")
    check(r.code == 401 and "www-authenticate" in r.headers, "a token with a bad signature: 401 with www-authenticate")
    r = c.curl("/jwt/profile", "-H", f"Authorization: Bearer {jwt('alice', exp_in=-600)}", note=" (alice, expired)")
    check(r.code == 401, "an expired token: 401")
    r = c.curl("/jwt/profile", "-H", f"Authorization: Bearer {jwt('bob')}", note=" (bob)")
    check(r.code == 403, "a valid token for bob: 403 (not the principal the policy names)")
    r = c.curl("/jwt/profile", "-H", f"Authorization: Bearer {jwt('alice')}", note=" (alice)")
    check(r.code == 200, "a valid token for alice: 200")
    n = c.hits("httpbin", "GET /jwt/profile") - before
    check(n == 1, f"httpbin saw 1 of the 5 requests (alice's), counted {n}")


def routes(c, say):
    lab = c.lab
    say("HTTPRoutes: a second version of httpbin, weighted backends, a timeout, a mirror, a rate limit", [
        "the JWT objects removed; pod demo/httpbin-v2 on node1 behind Service httpbin-v2 (" + V2_VIP + ");",
        "route-httpbin-traffic.yaml (parentRefs: Service httpbin): /split 90/10 httpbin/httpbin-v2, /slow timeout 500ms,",
        "  /mirror mirrored to httpbin-v2, the rest to httpbin;  route-httpbin-limited.yaml: /limited, 3 requests a minute"])
    c.delete("policy-require-alice.yaml")
    c.delete("requestauthn-jwt-lab.yaml")
    v2 = lab.add_pod(V2_POD)
    log(f"    {v2['namespace']}/{v2['name']} on {v2['nodeName']} ip {v2['ip']} (CNI ADD {v2['cni_ms']} ms)")
    c.apply("svc-httpbin-v2.yaml", V2_SERVICE)
    c.apply("route-httpbin-traffic.yaml", TRAFFIC_ROUTE)
    c.apply("route-httpbin-limited.yaml", LIMITED_ROUTE)

    def knows_v2(d):
        return V2_VIP in json.dumps(d.get("services")) and v2["ip"] in json.dumps(d.get("workloads"))
    c.wait_config(["deny-admin", "deny-header"], routes=["httpbin-traffic", "httpbin-limited"], extra=knows_v2)
    wait_for("httpbin-v2 listening", lambda: c.stats("httpbin-v2"), 20)
    wait_for("node1's ztunnel to know httpbin-v2", lambda: lab.ztunnel_knows(1), 30)


def weights(c, say):
    n, p = 1000, 0.10
    sigma = (n * p * (1 - p)) ** 0.5
    lo, hi = math.ceil(n * p - 5 * sigma), math.floor(n * p + 5 * sigma)
    # The exact chance that a correct 90/10 split lands outside lo..hi.
    false_fail = 1 - sum(math.comb(n, k) * p ** k * (1 - p) ** (n - k) for k in range(lo, hi + 1))
    say(f"Weighted backends: {n} requests to /split, 90/10 between httpbin and httpbin-v2", [
        f"binomial: expect {n * p:.0f} for v2, sigma {sigma:.1f}; accepted {lo}..{hi} (5 sigma: a correct split fails ~1 run in {1 / false_fail:,.0f})",
        f"$ ip netns exec {c.sleep['netns']} python3 e2e/lab/apps/client.py burst {VIP} {VIP_PORT} /split {n} 4"])
    before = {pod: c.hits(pod, "GET /split") for pod in ("httpbin", "httpbin-v2")}
    t0 = time.monotonic()
    out = c.client("burst", VIP, str(VIP_PORT), "/split", str(n), "4")
    log(f"    {n} requests in {time.monotonic() - t0:.1f}s: codes {out['codes']}, replies by {out['servers']}"
        + (f", errors {out['errors']}" if out["n_errors"] else ""))
    check(out["codes"] == {"200": n}, f"all {n} answered 200")
    v2 = out["servers"].get("httpbin-v2", 0)
    check(lo <= v2 <= hi, f"httpbin-v2 answered {v2} ({v2 / n:.1%}), within {lo}..{hi}")
    seen = {pod: c.hits(pod, "GET /split") - before[pod] for pod in before}
    log(f"    the apps counted: {seen}")
    check(seen == {"httpbin": n - v2, "httpbin-v2": v2}, "each app's own counter agrees with the replies (no request lost or doubled)")


def retries(c, say):
    say("Retries: Istio's default (2 retries on 503) with no retry policy on the route", [
        "/flaky/1/<key> answers 503 the first time, then 200; /status/503 always 503"])
    pos = c.wpos()
    key = f"/flaky/1/r{os.getpid()}"
    r = c.curl(key)
    check(r.code == 200 and r.json().get("try") == 2, f"the client got 200 from the second try (HTTP {r.code}, try {r.json().get('try')})")
    n = c.hits("httpbin", f"GET {key}")
    check(n == 2, f"httpbin saw both tries (counted {n})")
    line = c.access(pos, key)[0]
    c.show_line(line)
    check(line[1].get("attempts") == "2" and line[1].get("status") == "200", "the waypoint's access log: 2 attempts, status 200")
    before = c.hits("httpbin", "GET /status/503")
    r = c.curl("/status/503")
    n = c.hits("httpbin", "GET /status/503") - before
    check(r.code == 503 and n == 3, f"a persistent 503 is tried 1 + 2 times, then returned (httpbin saw {n})")


def timeout(c, say):
    say("Timeout: the route's timeouts.request 500ms against a backend that takes 3 s", [])
    pos = c.wpos()
    r = c.curl("/slow/3000")
    check(r.code == 504 and r.secs < 2.0, f"504 within 2 s (got HTTP {r.code} after {r.secs:.2f}s)")
    line = c.access(pos, "/slow/3000")[0]
    c.show_line(line)
    check(line[1].get("status") == "504" and "UT" in line[1].get("flags", ""), "the waypoint's access log: 504, flag UT")
    check(c.curl("/slow/10").code == 200, "a fast request on the same route still passes")


def mirror(c, say):
    say("Mirror: /mirror goes to httpbin, a copy to httpbin-v2 (its reply dropped)", [])
    key = f"/mirror/m{os.getpid()}"
    r = c.curl(key)
    check(r.code == 200 and r.json().get("server") == "httpbin", "the client's answer came from httpbin")
    got = wait_for("httpbin-v2 to see the copy", lambda: c.hits("httpbin-v2", f"GET {key}"), 10)
    host = c.stats("httpbin-v2")["last"].get(key, {}).get("host", "")
    log(f"    httpbin-v2 saw GET {key} x{got}, Host: {host}")
    check(got == 1 and host.split(":")[0].endswith("-shadow"), "httpbin-v2 got one copy, its Host marked -shadow")
    n = c.hits("httpbin", f"GET {key}")
    check(n == 1, f"httpbin got the request once (counted {n})")


def rate_limit(c, say):
    say("Local rate limit: route httpbin-limited allows 3 requests a minute (annotation waypoint.mesh.io/rate-limit-requests)", [])
    pos = c.wpos()
    codes = [c.curl("/limited/x", show=False).code for _ in range(5)]
    log(f"    sleep -> GET /limited/x five times: {codes}")
    check(codes == [200, 200, 200, 429, 429], "3 x 200, then 429 x 2")
    n = c.hits("httpbin", "GET /limited/x")
    check(n == 3, f"httpbin saw only the 3 allowed (counted {n})")
    limited = [l for l in c.access(pos, "/limited/x", 5) if l[1].get("status") == "429"]
    c.show_line(limited[0])
    check(len(limited) == 2 and all("RL" in l[1].get("flags", "") for l in limited), "the waypoint's access log: 429, flag RL")


def h2(c, say):
    say("HTTP/2 with prior knowledge (h2c) from sleep: the waypoint serves h2 on the HTTP port", [
        f"$ ip netns exec {c.sleep['netns']} curl --http2-prior-knowledge http://{VIP}:{VIP_PORT}/h2/N   (three times)"])
    pos = c.wpos()
    # One request per curl: curl 7.88's reuse of a prior-knowledge connection is broken (curl
    # issue 10634, fixed after 7.88.1).
    replies = [c.curl(f"/h2/{i}", "--http2-prior-knowledge") for i in range(3)]
    check(all(r.code == 200 and r.version == "2" and r.json().get("server") == "httpbin" for r in replies),
          "HTTP/2 200 three times, answered by httpbin")
    check(all(c.hits("httpbin", f"GET /h2/{i}") == 1 for i in range(3)), "httpbin saw each request once")
    # As Istio's: the upstream protocol follows the Service port, not the client. httpbin's
    # port is `http`, so the waypoint speaks HTTP/1.1 to it (only http2/grpc/h2c ports get h2
    # upstream; apps/h2c.py lets the app take h2c should that ever change).
    seen = {r.json().get("protocol") for r in replies}
    log(f"    httpbin saw them as {', '.join(sorted(seen))} (the waypoint's upstream protocol)")
    check(seen == {"HTTP/1.1"}, "the waypoint spoke HTTP/1.1 to httpbin's `http` port, as Istio's does")
    lines = c.access(pos, "/h2/0")
    c.show_line(lines[0])
    check(lines[0][1].get("status") == "200" and lines[0][1].get("protocol") == "http2", "the waypoint logged it: protocol http2, status 200")
    r = c.curl("/admin/h2", "--http2-prior-knowledge")
    check(r.code == 403 and r.version == "2", "L7 policy applies to h2 requests too: 403 over HTTP/2")


def grpc(c, say):
    cmd = f"$ ip netns exec {c.sleep['netns']} python3 e2e/lab/apps/client.py grpc {VIP} {GRPC_PORT}"
    say(f"gRPC: unary calls to httpbin's port {GRPC_PORT} (named grpc, appProtocol grpc), the trailers back through the waypoint", [
        "policy-deny-grpc-secret.yaml: DENY path /lab.Echo/Secret (targetRefs: the Gateway)",
        f"{cmd} /lab.Echo/Say 'hello over gRPC'   (also /lab.Echo/Fail and /lab.Echo/Secret)"])
    c.apply("policy-deny-grpc-secret.yaml", DENY_SECRET)
    c.wait_config(["deny-admin", "deny-header", "deny-grpc-secret"], routes=["httpbin-traffic", "httpbin-limited"])
    before = c.stats("httpbin")["hits"]
    pos = c.wpos()
    calls = {}
    for method in ("/lab.Echo/Say", "/lab.Echo/Fail", "/lab.Echo/Secret"):
        r = calls[method] = c.client("grpc", VIP, str(GRPC_PORT), method, "hello over gRPC", timeout=20)
        log(f"    sleep -> {method}: HTTP/2 {r['status']} {r['headers'].get('content-type', '-')}  messages {r['messages']}  "
            + ("trailers-only " + json.dumps({k: v for k, v in r["headers"].items() if k.startswith("grpc-")})
               if r["trailers_only"] else f"trailers {json.dumps(r['trailers'])}") + (f"  error: {r['error']}" if r["error"] else ""))
    echo = calls["/lab.Echo/Say"]
    check(echo["status"] == 200 and echo["headers"].get("content-type") == "application/grpc" and not echo["error"],
          "Say: HTTP 200, content-type application/grpc")
    check(echo["messages"] == ["hello over gRPC"], "Say: the message came back (the echo's DATA frame)")
    check(echo["trailers"].get("grpc-status") == "0" and echo["trailers"].get("grpc-message") == "ok",
          "Say: the trailers arrived after the data: grpc-status 0, grpc-message ok")
    fail = calls["/lab.Echo/Fail"]
    check(fail["status"] == 200 and fail["messages"] == [] and fail["trailers"].get("grpc-status") == "5"
          and fail["trailers"].get("grpc-message") == "no such thing", "Fail: trailers grpc-status 5 (NOT_FOUND), grpc-message no such thing")
    sec = calls["/lab.Echo/Secret"]
    check(sec["status"] == 200 and sec["trailers_only"] and sec["headers"].get("grpc-status") == "7"
          and sec["headers"].get("grpc-message") == "RBAC: access denied",
          "Secret: the waypoint's denial is a gRPC trailers-only reply, grpc-status 7 (PERMISSION_DENIED), RBAC: access denied")
    after = c.stats("httpbin")["hits"]
    seen = {k: after.get(k, 0) - before.get(k, 0) for k in (f"POST {m}" for m in calls)}
    log(f"    httpbin counted: {seen}")
    check(seen == {"POST /lab.Echo/Say": 1, "POST /lab.Echo/Fail": 1, "POST /lab.Echo/Secret": 0},
          "httpbin answered Say and Fail once each and never saw Secret")
    got = c.stats("httpbin")["last"].get("/lab.Echo/Say", {})
    log(f"    httpbin saw Say with content-type: {got.get('content-type')}, te: {got.get('te')}")
    check(got.get("content-type") == "application/grpc" and got.get("te") == "trailers",
          "the waypoint passed content-type and te: trailers on to httpbin")
    keys = ("src_identity", "method", "path", "protocol", "upstream_protocol", "status", "grpc_status", "policy", "upstream")
    lines = {m: c.access(pos, m)[0] for m in calls}
    for line in lines.values():
        c.show_line(line, keys)
    f = {m: lines[m][1] for m in calls}
    check(all(f[m].get("protocol") == "grpc" for m in calls), "the waypoint's access log: protocol grpc for all three")
    check(f["/lab.Echo/Say"].get("upstream_protocol") == "http2" and f["/lab.Echo/Fail"].get("upstream_protocol") == "http2",
          "the waypoint's access log: upstream_protocol http2 (the port is grpc)")
    check([f[m].get("grpc_status") for m in calls] == ["0", "5", "7"], "the waypoint's access log: grpc_status 0, 5 (from the trailers) and 7 (its own reply)")
    check(f["/lab.Echo/Secret"].get("policy") == "demo/deny-grpc-secret", "the denied call's line names demo/deny-grpc-secret")


def websocket(c, say):
    msg = "ping over the upgrade"
    say("WebSocket: an HTTP/1.1 Upgrade through the waypoint, then bytes both ways", [
        f"$ ip netns exec {c.sleep['netns']} python3 e2e/lab/apps/client.py ws {VIP} {VIP_PORT} /ws '{msg}'"])
    pos = c.wpos()
    out = c.client("ws", VIP, str(VIP_PORT), "/ws", msg, timeout=20)
    log(f"    {out}")
    check(out["status"] == 101 and out["accept_ok"] and out["upgrade"].lower() == "websocket", "101 Switching Protocols with the right Sec-WebSocket-Accept")
    check(out["echo"] == msg, "the message came back over the upgraded connection")
    n = c.hits("httpbin", "GET /ws")
    check(n == 1, f"httpbin saw one upgrade (counted {n})")
    line = c.access(pos, "/ws")[0]
    c.show_line(line)
    check(line[1].get("status") == "101", "the waypoint's access log: status 101")
