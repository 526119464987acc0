#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz targets into fuzz/corpus/<target>/ (committed; rerun
after changing a seed). Mux seeds are the golden vectors of ../shared/mux-protocol.md (§1.7,
§1.8, §1.10); the others come from the unit tests' vectors. Each target's first input byte, where
it has one, selects the scenario (see the target's header comment)."""
import os
import struct

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")


def frame(typ, tag, body, fragment=False):
    return struct.pack(">IB", len(body) + 4, typ) + struct.pack(">I", tag | (0x800000 if fragment else 0))[1:] + body


def s2(b):
    return struct.pack(">H", len(b)) + b


def s4(b):
    return struct.pack(">I", len(b)) + b


PROBE = frame(0x7F, 1, b"tinit check")
HEADERS = s4(b"mux-framer") + s4(b"\x7f\xff\xff\xff") + s4(b"tls") + s4(b"off")
TINIT = frame(0x44, 1, b"\x00\x01" + HEADERS)
RINIT = frame(0xBC, 1, b"\x00\x01" + HEADERS)
RINIT_FRAMER16 = frame(0xBC, 1, b"\x00\x01" + s4(b"mux-framer") + s4(b"\x00\x00\x00\x10"))
TPING, RPING = frame(0x41, 1, b""), frame(0xBF, 1, b"")
TDRAIN, RDRAIN = frame(0x40, 1, b""), frame(0xC0, 1, b"")
TDISCARDED = frame(0xC2, 0, b"\x00\x00\x02timeout")
RDISCARDED = frame(0xBE, 2, b"")
TLEASE = frame(0x43, 0, b"\x00" + struct.pack(">Q", 10000))
NACK = frame(0xFE, 3, b"\x02\x00\x01" + s2(b"MuxFailure") + s2(struct.pack(">Q", 3)))
ERROR = frame(0xFE, 4, b"\x01\x00\x00boom")
ECHO_CALL = b"\x80\x01\x00\x01\x00\x00\x00\x04echo\x00\x00\x00\x00\x0b\x00\x01\x00\x00\x00\x02hi\x00"
ECHO_REPLY = b"\x80\x01\x00\x02\x00\x00\x00\x04echo\x00\x00\x00\x00\x0b\x00\x00\x00\x00\x00\x02hi\x00"
TDISPATCH_BODY = (b"\x00\x01" + s2(b"com.twitter.finagle.thrift.ClientIdContext") + s2(b"svc-a")
                  + b"\x00\x00\x00\x00" + ECHO_CALL)
TDISPATCH = frame(0x02, 2, TDISPATCH_BODY)
RDISPATCH = frame(0xFE, 2, b"\x00\x00\x00" + ECHO_REPLY)
RERR = frame(0x7F, 4, b"Unexpected mux message type 127")
HEADERS_CTX = s2(b"com.twitter.finagle.thrift.Response.headers") + s2(s2(b"k") + s2(b"v"))
RDISPATCH_HEADERS = frame(0xFE, 2, b"\x00\x00\x01" + HEADERS_CTX + ECHO_REPLY)


def fragmented(typ, tag, body, size):
    out = b""
    for off in range(0, len(body), size):
        piece = body[off:off + size]
        out += frame(typ, tag, piece, fragment=off + size < len(body))
    return out


def write(target, name, data):
    d = os.path.join(ROOT, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def main():
    golden = {
        "probe": PROBE, "tinit": TINIT, "rinit": RINIT, "tping": TPING, "rping": RPING,
        "tdrain": TDRAIN, "rdrain": RDRAIN, "tdiscarded": TDISCARDED, "rdiscarded": RDISCARDED,
        "tlease": TLEASE, "nack": NACK, "error": ERROR, "tdispatch": TDISPATCH,
        "rdispatch": RDISPATCH, "rerr": RERR, "rdispatch_headers": RDISPATCH_HEADERS,
        "tdispatch_fragmented16": fragmented(0x02, 2, TDISPATCH_BODY, 16),
        "rdispatch_fragmented": fragmented(0xFE, 2, b"\x00\x00\x00" + ECHO_REPLY, 7),
        "interleaved": fragmented(0xFE, 2, b"\x00\x00\x00" + ECHO_REPLY, 9)[:26] + NACK
        + fragmented(0xFE, 2, b"\x00\x00\x00" + ECHO_REPLY, 9)[26:],
    }
    for name, data in golden.items():
        write("mux_frame_fuzzer", name, b"\x00" + data)
    write("mux_frame_fuzzer", "all_split3", b"\x03" + b"".join(golden.values()))

    # Session: 0x00 = no handshake, requests on tags 2, 3 (discarded) and 4.
    session = {
        "replies": b"\x00" + RDISPATCH + frame(0xFE, 4, b"\x00\x00\x00" + ECHO_REPLY) + frame(0xBE, 3, b""),
        "errors": b"\x02" + ERROR + NACK + frame(0x7F, 2, b"no") + frame(0xFE, 3, b"\x00\x00\x00"),
        "control": b"\x00" + TPING + TLEASE + RPING + TDISCARDED + TDRAIN + RDISPATCH,
        "fragments": b"\x02" + fragmented(0xFE, 2, b"\x00\x00\x00" + ECHO_REPLY, 5) + ERROR,
        "headers": b"\x00" + RDISPATCH_HEADERS,
        "stray_fragments": b"\x00" + fragmented(0xFE, 9, b"\x00\x00\x00" + ECHO_REPLY, 8)[:30] + RDISPATCH,
        "server_dispatch": b"\x00" + TDISPATCH,
        "handshake": b"\x01" + PROBE + RINIT + RDISPATCH,
        "handshake_framer": b"\x03" + PROBE + RINIT_FRAMER16 + TPING,
        "handshake_old_server": b"\x01" + frame(0x7F, 1, b"Unexpected mux message type 127"),
        "handshake_rejected": b"\x01" + PROBE + frame(0x7F, 1, b"version"),
    }
    for name, data in session.items():
        write("mux_session_fuzzer", name, data)

    def binary_reply(name, typ, seqid, body):
        return b"\x80\x01\x00" + bytes([typ]) + s4(name) + struct.pack(">i", seqid) + body

    thrift = {
        "binary_reply": binary_reply(b"echo", 2, 1, b"\x0b\x00\x00" + s4(b"hi") + b"\x00"),
        "binary_exception": binary_reply(b"echo", 3, 1, b"\x0b\x00\x01" + s4(b"boom") + b"\x08\x00\x02\x00\x00\x00\x06\x00"),
        "binary_wrong_seqid": binary_reply(b"echo", 2, 7, b"\x00"),
        "binary_nested": binary_reply(b"echo", 2, 1, b"\x0c\x00\x00\x0f\x00\x01\x0b\x00\x00\x00\x01" + s4(b"x")
                                       + b"\x0d\x00\x02\x08\x0b\x00\x00\x00\x01\x00\x00\x00\x01" + s4(b"y") + b"\x00\x00"),
        "lenient_reply": s4(b"echo") + b"\x02" + struct.pack(">i", 1) + b"\x0b\x00\x00" + s4(b"hi") + b"\x00",
        "compact_reply": b"\x82\x41\x01\x04echo\x18\x02hi\x00",
        "compact_exception": b"\x82\x61\x01\x04echo\x1c\x18\x04boom\x15\x0c\x00\x00",
        "compact_containers": b"\x82\x41\x01\x04echo\x09\x28\x01a\x01b\x1b\x02\x58\x02\x02k\x02v\x02x\x00\x00",
    }
    for name, data in thrift.items():
        write("thrift_reply_fuzzer", name, data)

    http = {
        "ok": b"\x00HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nhi",
        "chunked": b"\x02HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n3;x=y\r\nyou\r\n0\r\nT: 1\r\n\r\n",
        "close_delimited": b"\x00HTTP/1.0 200 OK\r\nConnection: close\r\n\r\nbody until close",
        "not_found": b"\x04HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\n\r\nnot found",
        "head": b"\x01HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n",
        "no_content": b"\x00HTTP/1.1 204 No Content\r\n\r\n",
        "huge_length": b"\x00HTTP/1.1 200 OK\r\nContent-Length: 2147483648\r\n\r\nxx",
        "trailing_bytes": b"\x00HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\nHTTP/1.1 200 OK\r\n",
    }
    for name, data in http.items():
        write("http_response_fuzzer", name, data)

    members = {
        "finagle": b'{"serviceEndpoint":{"host":"10.1.2.3","port":9090},"additionalEndpoints":'
                   b'{"http":{"host":"10.1.2.3","port":8080},"admin":{"host":"10.1.2.3","port":9990}},'
                   b'"status":"ALIVE","shard":4,"metadata":{"zone":"a"}}',
        "minimal": b'{"serviceEndpoint":{"host":"h","port":1},"additionalEndpoints":{},"status":"DEAD"}',
        "odd_values": b'{"serviceEndpoint":{"host":"::1","port":65535},"status":"ALIVE","shard":"x",'
                      b'"metadata":{"a":1,"b":"c"},"extra":[1,2,{"d":null}]}',
        "bad_port": b'{"serviceEndpoint":{"host":"h","port":70000},"status":"ALIVE"}',
    }
    for name, data in members.items():
        write("serverset_member_fuzzer", name, data)

    uris = ["tcp://localhost:8080,localhost:8081", "zk://zk1.zk.com:2181/test/path",
            "zk://a:1/svc#thrift?session_timeout=10s&retries=3", "tcp://[::1]:80,b:2",
            "tcp://[fe80::1%eth0]:80", "zk://a:1/svc?k=a=b", "TCP://a:1/whatever", "tcp://a:99999"]
    for i, u in enumerate(uris):
        write("uri_fuzzer", "uri%d" % i, u.encode())


if __name__ == "__main__":
    main()
