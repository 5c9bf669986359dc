"""The lab's scripted client (stdlib only), run inside a pod's netns for what one curl cannot do.
It prints one JSON document.

  python3 client.py burst HOST PORT PATH N CONNS   N GETs over CONNS keep-alive connections:
                                                   status codes and replying servers counted
  python3 client.py ws HOST PORT PATH MESSAGE      a WebSocket upgrade, MESSAGE sent over the
                                                   upgraded connection and read back
  python3 client.py grpc HOST PORT METHOD TEXT     one unary gRPC call over h2c (prior knowledge):
                                                   TEXT as field 1 of a protobuf message; the reply's
                                                   status, headers, messages and trailers
"""

import base64
import hashlib
import http.client
import json
import os
import socket
import sys
import threading

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import h2c  # noqa: E402  (its framing and HPACK decoder)

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


def grpc(host, port, method, text):
    """A unary call on stream 1: literal request headers (h2c.encode_fields), the server's
    header blocks decoded with h2c's HPACK decoder (hyper Huffman-codes and indexes them)."""
    raw = text.encode()
    assert len(raw) < 128
    msg = b"\x0a" + bytes([len(raw)]) + raw  # protobuf: field 1, length-delimited
    s = socket.create_connection((host, int(port)), timeout=10)
    rfile = s.makefile("rb")
    block = h2c.encode_fields([(":method", "POST"), (":scheme", "http"), (":path", method),
                               (":authority", f"{host}:{port}"), ("content-type", "application/grpc"),
                               ("te", "trailers"), ("user-agent", "lab-grpc-client/1")])
    s.sendall(h2c.PREFACE + h2c.frame(h2c.SETTINGS, 0, 0)
              + h2c.frame(h2c.HEADERS, h2c.END_HEADERS, 1, block)
              + h2c.frame(h2c.DATA, h2c.END_STREAM, 1, b"\x00" + len(msg).to_bytes(4, "big") + msg))
    dec, blocks, data, block, ended, closing, error = h2c.Decoder(), [], b"", b"", False, False, None
    while not ended:
        f = h2c.read_frame(rfile)
        if f is None:
            error = "connection closed before the end of the stream"
            break
        ftype, flags, sid, payload, _ = f
        if ftype == h2c.SETTINGS and not flags & h2c.ACK:
            s.sendall(h2c.frame(h2c.SETTINGS, h2c.ACK, 0))
        elif ftype == h2c.PING and not flags & h2c.ACK:
            s.sendall(h2c.frame(h2c.PING, h2c.ACK, 0, payload))
        elif ftype == h2c.GOAWAY:
            error = f"GOAWAY code {int.from_bytes(payload[4:8], 'big')}"
            break
        elif sid != 1:
            continue
        elif ftype in (h2c.HEADERS, h2c.CONTINUATION):
            block += payload
            closing = bool(flags & h2c.END_STREAM) if ftype == h2c.HEADERS else closing
            if flags & h2c.END_HEADERS:  # the block is complete (END_STREAM waits for it)
                blocks.append(dec.decode(block))
                block, ended = b"", closing
        elif ftype == h2c.DATA:
            data += payload
            ended = bool(flags & h2c.END_STREAM)
        elif ftype == h2c.RST_STREAM:
            error = f"RST_STREAM code {int.from_bytes(payload[:4], 'big')}"
            break
    s.close()
    head = dict(blocks[0]) if blocks else {}
    messages = []
    while len(data) >= 5:
        n = int.from_bytes(data[1:5], "big")
        m, data = data[5:5 + n], data[5 + n:]
        messages.append(m[2:2 + m[1]].decode("latin-1") if m[:1] == b"\x0a" else m.hex())
    return {"status": int(head.get(":status", 0)), "headers": {k: v for k, v in head.items() if k != ":status"},
            "messages": messages, "trailers": dict(blocks[1]) if len(blocks) > 1 else {},
            "trailers_only": len(blocks) == 1 and "grpc-status" in head, "error": error}


if __name__ == "__main__":
    cmd, a = sys.argv[1], sys.argv[2:]
    if cmd == "burst":
        out = burst(a[0], int(a[1]), a[2], int(a[3]), int(a[4]))
    elif cmd == "ws":
        out = ws(a[0], a[1], a[2], a[3])
    elif cmd == "grpc":
        out = grpc(a[0], a[1], a[2], a[3])
    else:
        sys.exit(f"unknown command {cmd}")
    print(json.dumps(out))
