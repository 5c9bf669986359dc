"""An httpbin-like HTTP server for the lab (stdlib only): every request is answered with a
small JSON document saying who served it and who the server saw as the client, so source-IP
preservation (and the kubelet-probe SNAT) is visible in the reply.

  python3 httpbin.py PORT NAME
"""

import json
import socket
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "lab-httpbin/1"

    def _reply(self, received):
        body = (json.dumps({
            "server": self.server.name,
            "server_ip": self.connection.getsockname()[0],
            "client": "%s:%d" % self.client_address[:2],
            "path": self.path,
            "bytes_received": received,
        }) + "\n").encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self._reply(0)

    def do_POST(self):
        n = int(self.headers.get("Content-Length") or 0)
        got = 0
        while got < n:
            b = self.rfile.read(min(65536, n - got))
            if not b:
                break
            got += len(b)
        self._reply(got)

    def log_message(self, fmt, *args):
        sys.stderr.write("%s %s\n" % (self.client_address[0], fmt % args))
        sys.stderr.flush()


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    address_family = socket.AF_INET


if __name__ == "__main__":
    srv = Server(("0.0.0.0", int(sys.argv[1])), Handler)
    srv.name = sys.argv[2] if len(sys.argv) > 2 else "httpbin"
    srv.serve_forever()
