"""A small HTTP/2 server side over cleartext with prior knowledge (h2c, RFC 9113 §3.3), stdlib
only, for the lab's httpbin: enough for a proxy's client to send requests and read replies.

What it does: the preface and SETTINGS exchange, HEADERS + CONTINUATION decoded with HPACK
(RFC 7541: static and dynamic table, Huffman strings), DATA with flow-control credit given
back, PING, RST_STREAM, GOAWAY; each request is answered (HEADERS, then DATA, then trailers
if the handler gives any, as gRPC needs) from its own thread, so streams run concurrently on
one connection. What it does not: priorities, server push, request trailers, enforcing the
peer's flow-control window (the replies are a few hundred bytes) or SETTINGS limits; a
protocol error just closes the connection. apps/client.py's gRPC client reuses the framing
and the HPACK decoder.
"""

import struct
import threading

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM, ACK, END_HEADERS, PADDED, PRIO = 0x1, 0x1, 0x4, 0x8, 0x20

STATIC = [(n, "") for n in (":authority",)] + [
    (":method", "GET"), (":method", "POST"), (":path", "/"), (":path", "/index.html"),
    (":scheme", "http"), (":scheme", "https"), (":status", "200"), (":status", "204"),
    (":status", "206"), (":status", "304"), (":status", "400"), (":status", "404"),
    (":status", "500"), ("accept-charset", ""), ("accept-encoding", "gzip, deflate")] + [(n, "") for n in (
        "accept-language accept-ranges accept access-control-allow-origin age allow authorization "
        "cache-control content-disposition content-encoding content-language content-length "
        "content-location content-range content-type cookie date etag expect expires from host "
        "if-match if-modified-since if-none-match if-range if-unmodified-since last-modified link "
        "location max-forwards proxy-authenticate proxy-authorization range referer refresh "
        "retry-after server set-cookie strict-transport-security transfer-encoding user-agent vary "
        "via www-authenticate").split()]
assert len(STATIC) == 61

# RFC 7541 Appendix B: the Huffman code is canonical, so the code length of each symbol
# (0..255, then EOS), as chr(48 + length), is enough to rebuild it.
_LENGTHS = ("=GLLLLLLLHNLLNLLLLLLLLNLLLLLLLLL6::<=68;::8;8666555666666678?6<:=67777777777777777777777878=C=>6?5656566"
            "6577666567655677777?;>=LDFDDFFFGFGGGGGHGHHFGHGGGGEFGFGGHFEDFFGGEGFFHEFGGEEFEGFGGDFFFGFFGJJDCFGFIJJJKKJH"
            "ICEJKKJKHEEJJLKKKDHDEFEEGFFIIHHJGJKJJKKKKKLKKKKKJN")


def _huffman_table():
    lengths = [ord(c) - 48 for c in _LENGTHS]
    table, code, prev = {}, -1, 0
    for sym in sorted(range(257), key=lambda s: (lengths[s], s)):
        code = (code + 1) << (lengths[sym] - prev)
        prev = lengths[sym]
        table[(prev, code)] = sym
    return table


HUFFMAN = _huffman_table()


def huffman_decode(data):
    out, code, n = bytearray(), 0, 0
    for byte in data:
        for i in range(7, -1, -1):
            code, n = (code << 1) | ((byte >> i) & 1), n + 1
            sym = HUFFMAN.get((n, code))
            if sym is not None:
                if sym == 256:
                    raise ValueError("EOS in a Huffman string")
                out.append(sym)
                code, n = 0, 0
    if n > 7 or code != (1 << n) - 1:
        raise ValueError("bad Huffman padding")
    return bytes(out)


class Decoder:
    def __init__(self):
        self.dynamic, self.size, self.max = [], 0, 4096

    def _int(self, b, i, prefix):
        mask = (1 << prefix) - 1
        v, i = b[i] & mask, i + 1
        if v < mask:
            return v, i
        shift = 0
        while True:
            c = b[i]
            i += 1
            v += (c & 0x7F) << shift
            shift += 7
            if not c & 0x80:
                return v, i

    def _str(self, b, i):
        huff = b[i] & 0x80
        n, i = self._int(b, i, 7)
        raw = bytes(b[i:i + n])
        return (huffman_decode(raw) if huff else raw).decode("latin-1"), i + n

    def _get(self, idx):
        if 1 <= idx <= 61:
            return STATIC[idx - 1]
        if 62 <= idx < 62 + len(self.dynamic):
            return self.dynamic[idx - 62]
        raise ValueError(f"HPACK index {idx} out of range")

    def _evict(self):
        while self.size > self.max and self.dynamic:
            n, v = self.dynamic.pop()
            self.size -= len(n) + len(v) + 32

    def decode(self, b):
        out, i = [], 0
        while i < len(b):
            c = b[i]
            if c & 0x80:  # indexed
                idx, i = self._int(b, i, 7)
                out.append(self._get(idx))
            elif c & 0xE0 == 0x20:  # dynamic table size update
                self.max, i = self._int(b, i, 5)
                self._evict()
            else:  # literal: with incremental indexing (01), without (0000), never indexed (0001)
                incr = c & 0xC0 == 0x40
                idx, i = self._int(b, i, 6 if incr else 4)
                if idx:
                    name = self._get(idx)[0]
                else:
                    name, i = self._str(b, i)
                value, i = self._str(b, i)
                out.append((name, value))
                if incr:
                    self.dynamic.insert(0, (name, value))
                    self.size += len(name) + len(value) + 32
                    self._evict()
        return out


def _hpack_str(s):
    b = s.encode("latin-1")
    assert len(b) < 127
    return bytes([len(b)]) + b


def encode_fields(headers):
    # Every field a literal without indexing (0000), name and value not Huffman-coded.
    return b"".join(b"\x00" + _hpack_str(k.lower()) + _hpack_str(v) for k, v in headers)


def encode_headers(status, headers):
    # :status by its static name index (8), then the rest as encode_fields does.
    return b"\x08" + _hpack_str(str(status)) + encode_fields(headers)


def frame(ftype, flags, stream, payload=b""):
    return struct.pack(">I", len(payload))[1:] + bytes([ftype, flags]) + struct.pack(">I", stream) + payload


def read_frame(rfile):
    """(type, flags, stream, payload, length on the wire): payload without padding (the length,
    with it, is what flow control counts); None at EOF or on a short frame."""
    head = rfile.read(9)
    if len(head) < 9:
        return None
    length = int.from_bytes(head[:3], "big")
    ftype, flags = head[3], head[4]
    sid = int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
    payload = rfile.read(length)
    if len(payload) < length:
        return None
    if ftype in (DATA, HEADERS) and flags & PADDED:
        payload = payload[1:len(payload) - payload[0]]
    if ftype == HEADERS and flags & PRIO:
        payload = payload[5:]
    return ftype, flags, sid, payload, length


def serve(rfile, wfile, handler, log=lambda m, p, s: None):
    """Serves one connection. handler(method, path, [(name, value)], body) -> (status, headers,
    body) or (status, headers, body, trailers): with trailers, no content-length, and the
    stream ends with a HEADERS frame of trailers."""
    if rfile.read(len(PREFACE)) != PREFACE:
        return
    lock = threading.Lock()

    def send(*frames):
        with lock:
            wfile.write(b"".join(frames))
            wfile.flush()

    # Our SETTINGS (defaults, plus a large per-stream window), and a large connection window.
    send(frame(SETTINGS, 0, 0, struct.pack(">HI", 4, 1 << 24)), frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", 1 << 24)))
    dec = Decoder()
    streams = {}  # id -> {"headers": [...], "block": bytes, "body": bytearray}
    pending = None  # stream whose header block is still open (CONTINUATION)

    def answer(sid, st):
        hs = dict(st["headers"])
        try:
            reply = handler(hs.get(":method", ""), hs.get(":path", ""),
                            [(k, v) for k, v in st["headers"] if not k.startswith(":")], bytes(st["body"]))
        except Exception as e:  # noqa: BLE001 (an app error is a 500, not a dead connection)
            reply = 500, [("content-type", "text/plain")], f"{e}\n".encode()
        status, headers, body, trailers = (*reply, None)[:4]
        log(hs.get(":method"), hs.get(":path"), status)
        if trailers is not None:
            send(frame(HEADERS, END_HEADERS, sid, encode_headers(status, headers)),
                 *([frame(DATA, 0, sid, body)] if body else []),
                 frame(HEADERS, END_HEADERS | END_STREAM, sid, encode_fields(trailers)))
            return
        block = encode_headers(status, list(headers) + [("content-length", str(len(body)))])
        send(frame(HEADERS, END_HEADERS | (0 if body else END_STREAM), sid, block),
             *([frame(DATA, END_STREAM, sid, body)] if body else []))

    def header_block_done(sid):
        st = streams[sid]
        st["headers"] = dec.decode(st.pop("block"))
        if st.pop("ended"):
            threading.Thread(target=answer, args=(sid, streams.pop(sid)), daemon=True).start()

    while True:
        f = read_frame(rfile)
        if f is None:
            return
        ftype, flags, sid, payload, length = f
        if pending is not None and ftype != CONTINUATION:
            return  # a header block must not be interrupted
        if ftype == HEADERS:
            streams[sid] = st = streams.get(sid) or {"body": bytearray()}
            st["block"], st["ended"] = payload, bool(flags & END_STREAM)
            if flags & END_HEADERS:
                header_block_done(sid)
            else:
                pending = sid
        elif ftype == CONTINUATION:
            if sid != pending:
                return
            streams[sid]["block"] += payload
            if flags & END_HEADERS:
                pending = None
                header_block_done(sid)
        elif ftype == DATA:
            st = streams.get(sid)
            if length:
                send(frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", length)),
                     *([frame(WINDOW_UPDATE, 0, sid, struct.pack(">I", length))] if not flags & END_STREAM else []))
            if st is None:
                continue
            st["body"] += payload
            if flags & END_STREAM:
                threading.Thread(target=answer, args=(sid, streams.pop(sid)), daemon=True).start()
        elif ftype == SETTINGS and not flags & ACK:
            send(frame(SETTINGS, ACK, 0))
        elif ftype == PING and not flags & ACK:
            send(frame(PING, ACK, 0, payload))
        elif ftype == RST_STREAM:
            streams.pop(sid, None)
        elif ftype == GOAWAY:
            return
        # PRIORITY, WINDOW_UPDATE, PUSH_PROMISE (never from a client), unknown types: ignored.
