"""An httpbin-like HTTP server for the lab (stdlib only): every request is answered with a
small JSON document saying who served it and who the server saw as the client, so source-IP
preservation (and the kubelet-probe SNAT) is visible in the reply.

  python3 httpbin.py PORT NAME [GRPC_PORT]

Besides the default reply (any path, GET or POST), what the waypoint scenarios need:

  /status/<code>       answers <code>
  /flaky/<n>/<key>     answers 503 the first <n> times this path is asked, then 200
  /slow/<ms>           answers after <ms> milliseconds
  /ws                  a WebSocket-style upgrade (101), then echoes the raw bytes it gets
  /_lab/stats          what this server saw (not counted): requests per "METHOD path" and
                       the headers of the last request per path; the lab asks it directly
                       from the node (like the kubelet's probe), not through the mesh

Every request is also logged to stderr (the app's log in the lab's logs dir). HTTP/2 with
prior knowledge (h2c) is served too, by apps/h2c.py, with the same handlers.

gRPC (over h2c, content-type application/grpc, on either port; the lab's Service names
GRPC_PORT `grpc`): a unary echo for any method, counted as "POST <method path>". The reply is
HTTP 200, the request's length-prefixed message as DATA, then trailers grpc-status 0,
grpc-message ok; /lab.Echo/Fail gets no message and grpc-status 5 (NOT_FOUND).
"""

import base64
import hashlib
import json
import os
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import h2c  # noqa: E402

WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC11B65"


def count(server, method, bare, headers):
    with server.lock:
        n = server.hits[f"{method} {bare}"] = server.hits.get(f"{method} {bare}", 0) + 1
        server.last[bare] = {k.lower(): v for k, v in headers}
    return n


def respond(server, method, path, headers, body_len, conn, protocol):
    """The app's logic for one request, whatever the protocol: (status, headers, body)."""
    bare = path.split("?", 1)[0]
    if bare == "/_lab/stats":
        with server.lock:
            doc = {"server": server.name, "hits": dict(server.hits), "last": dict(server.last)}
        return 200, [("content-type", "application/json")], (json.dumps(doc) + "\n").encode()
    n = count(server, method, bare, headers)
    status = 200
    parts = bare.split("/")
    if bare.startswith("/status/") and parts[2].isdigit():
        status = int(parts[2])
    elif bare.startswith("/flaky/") and len(parts) > 3 and parts[2].isdigit():
        status = 503 if n <= int(parts[2]) else 200
    elif bare.startswith("/slow/") and parts[2].isdigit():
        time.sleep(int(parts[2]) / 1000)
    body = (json.dumps({
        "server": server.name,
        "server_ip": conn.getsockname()[0],
        "client": "%s:%d" % conn.getpeername()[:2],
        "method": method,
        "path": path,
        "protocol": protocol,
        "try": n,
        "bytes_received": body_len,
    }) + "\n").encode()
    return status, [("content-type", "application/json")], body


def grpc_respond(server, path, headers, body):
    """A unary gRPC echo: (status, headers, body, trailers)."""
    count(server, "POST", path, headers)
    head = [("content-type", "application/grpc")]
    if path == "/lab.Echo/Fail":
        return 200, head, b"", [("grpc-status", "5"), ("grpc-message", "no such thing")]
    # The request is one length-prefixed message (1 byte compressed flag, 4 bytes length).
    if len(body) < 5 or len(body) != 5 + int.from_bytes(body[1:5], "big"):
        return 200, head, b"", [("grpc-status", "13"), ("grpc-message", f"bad framing ({len(body)} bytes)")]
    return 200, head, body, [("grpc-status", "0"), ("grpc-message", "ok")]


def h2_respond(handler, method, path, headers, body):
    if dict(headers).get("content-type", "").startswith("application/grpc"):
        return grpc_respond(handler.server, path, headers, body)
    return respond(handler.server, method, path, headers, len(body), handler.connection, "HTTP/2")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "lab-httpbin/1"
    # The head and the body are two writes; with Nagle on, the body waits for the peer's
    # delayed ACK of the head (~40 ms a request on keep-alive connections).
    disable_nagle_algorithm = True

    def handle(self):
        # HTTP/2 with prior knowledge starts with the connection preface instead of a request.
        if self.rfile.peek(len(h2c.PREFACE))[:len(h2c.PREFACE)] == h2c.PREFACE:
            h2c.serve(self.rfile, self.wfile, lambda m, p, h, b: h2_respond(self, m, p, h, b),
                      log=lambda m, p, s: self._log(f'"{m} {p} HTTP/2" {s}'))
            return
        super().handle()

    def _serve(self, received):
        status, headers, body = respond(self.server, self.command, self.path, self.headers.items(), received,
                                        self.connection, self.request_version)
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path.split("?", 1)[0] == "/ws" and self.headers.get("Upgrade", "").lower() == "websocket":
            return self._websocket()
        self._serve(0)

    def do_POST(self):
        n = int(self.headers.get("Content-Length") or 0)
        got = 0
        while got < n:
            b = self.rfile.read(min(65536, n - got))
            if not b:
                break
            got += len(b)
        self._serve(got)

    def _websocket(self):
        count(self.server, "GET", "/ws", self.headers.items())
        key = self.headers.get("Sec-WebSocket-Key", "")
        accept = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        self.end_headers()
        self.wfile.flush()
        # After the 101 the connection is a byte stream: echo what arrives until EOF.
        while True:
            data = self.rfile.read1(65536)
            if not data:
                break
            self.wfile.write(data)
        self.close_connection = True

    def _log(self, msg):
        sys.stderr.write("%s %s\n" % (self.client_address[0], msg))
        sys.stderr.flush()

    def log_message(self, fmt, *args):
        self._log(fmt % args)


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    address_family = socket.AF_INET


if __name__ == "__main__":
    srv = Server(("0.0.0.0", int(sys.argv[1])), Handler)
    srv.name = sys.argv[2] if len(sys.argv) > 2 else "httpbin"
    srv.lock = threading.Lock()
    srv.hits, srv.last = {}, {}
    if len(sys.argv) > 3:  # the gRPC port: the same handlers and counters
        grpc_srv = Server(("0.0.0.0", int(sys.argv[3])), Handler)
        grpc_srv.name, grpc_srv.lock, grpc_srv.hits, grpc_srv.last = srv.name, srv.lock, srv.hits, srv.last
        threading.Thread(target=grpc_srv.serve_forever, daemon=True).start()
    srv.serve_forever()
