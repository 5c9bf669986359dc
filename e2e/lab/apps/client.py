"""The lab's scripted client (stdlib only), run inside a pod's netns for what one curl cannot do.
It prints one JSON document.

  python3 client.py burst HOST PORT PATH N CONNS   N GETs over CONNS keep-alive connections:
                                                   status codes and replying servers counted
  python3 client.py ws HOST PORT PATH MESSAGE      a WebSocket upgrade, MESSAGE sent over the
                                                   upgraded connection and read back
"""

import base64
import hashlib
import http.client
import json
import os
import socket
import sys
import threading

WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC11B65"


def burst(host, port, path, n, conns):
    codes, servers, errors = {}, {}, []
    lock = threading.Lock()

    def worker(count):
        c = http.client.HTTPConnection(host, port, timeout=10)
        for _ in range(count):
            try:
                c.request("GET", path)
                r = c.getresponse()
                body = r.read()
                server = json.loads(body).get("server", "?") if r.status == 200 else "-"
            except (OSError, http.client.HTTPException, ValueError) as e:
                with lock:
                    errors.append(repr(e))
                c.close()
                c = http.client.HTTPConnection(host, port, timeout=10)
                continue
            with lock:
                codes[r.status] = codes.get(r.status, 0) + 1
                servers[server] = servers.get(server, 0) + 1
        c.close()

    threads = [threading.Thread(target=worker, args=(n // conns + (i < n % conns),)) for i in range(conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"codes": codes, "servers": servers, "errors": errors[:5], "n_errors": len(errors)}


def ws(host, port, path, message):
    key = base64.b64encode(os.urandom(16)).decode()
    s = socket.create_connection((host, int(port)), timeout=10)
    s.sendall((f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
               f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        b = s.recv(4096)
        if not b:
            break
        head += b
    head, _, rest = head.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1]) if lines and len(lines[0].split()) > 1 else 0
    headers = {k.strip().lower(): v.strip() for k, _, v in (l.partition(":") for l in lines[1:])}
    want = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
    echo = rest
    data = message.encode()
    if status == 101:
        s.sendall(data)
        while len(echo) < len(data):
            b = s.recv(4096)
            if not b:
                break
            echo += b
    s.close()
    return {"status": status, "accept_ok": headers.get("sec-websocket-accept") == want,
            "upgrade": headers.get("upgrade", ""), "echo": echo.decode("latin-1")}


if __name__ == "__main__":
    cmd, a = sys.argv[1], sys.argv[2:]
    if cmd == "burst":
        out = burst(a[0], int(a[1]), a[2], int(a[3]), int(a[4]))
    elif cmd == "ws":
        out = ws(a[0], a[1], a[2], a[3])
    else:
        sys.exit(f"unknown command {cmd}")
    print(json.dumps(out))
