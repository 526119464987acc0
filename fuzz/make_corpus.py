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
    all_golden = b"".join(golden.values())
    # The target's limits: 512-byte frames (size field), 96 reassembled bytes per tag.
    golden.update({
        "frame_at_limit": frame(0xFE, 2, b"\x00\x00\x00" + b"f" * (512 - 4 - 3)),
        "frame_over_limit": frame(0xFE, 2, b"\x00\x00\x00" + b"f" * (512 - 4 - 2)),
        "reassembled_at_limit": fragmented(0xFE, 2, b"\x00\x00\x00" + b"r" * 93, 30),
        "reassembled_over_limit": fragmented(0xFE, 2, b"\x00\x00\x00" + b"r" * 94, 30),
        "first_fragment_over": frame(0xFE, 2, b"\x00\x00\x00" + b"r" * 94, fragment=True) + RDISPATCH,
    })
    for name, data in golden.items():
        write("mux_frame_fuzzer", name, b"\x00" + data)
    write("mux_frame_fuzzer", "all_split3", b"\x03" + all_golden)

    # Session: byte 0 = flags (bit 0 handshake, bit 1 pings, bit 2 tiny limits, bit 3 requests
    # started from completions, bit 4 those cancelled at once), byte 1 = script length, the
    # script, then the server's stream (see mux_session_fuzzer.cc). The target's limits:
    # 512-byte frames, 64 reassembled bytes.
    HANDSHAKE, PINGS, TINY, FOLLOW, CANCEL_FOLLOW = 1, 2, 4, 8, 16

    def send_frames(n=1):
        return bytes([(0 << 5) | (n - 1)])

    def send_bytes(n):
        return bytes([(1 << 5) | (n - 1)])

    def start(n=1):
        return bytes([(2 << 5) | (n - 1)])

    def cancel(i):
        return bytes([(3 << 5) | i])

    def advance(tenths):  # x 100 ms
        return bytes([(4 << 5) | (tenths - 1)])

    EOF_NOW = bytes([5 << 5])

    def session(flags, script, stream):
        return bytes([flags, len(script)]) + script + stream

    def rdispatch(tag, reply=ECHO_REPLY, status=0):
        return frame(0xFE, tag, bytes([status]) + b"\x00\x00" + reply)

    def flagged_error(tag, flags, why):  # Rdispatch Error with MuxFailure flags (§1.5)
        return frame(0xFE, tag, b"\x01\x00\x01" + s2(b"MuxFailure") + s2(struct.pack(">Q", flags)) + why)

    # The old scenario: three requests in flight (tags 2, 3, 4), the one on tag 3 cancelled
    # after it was written (discarded: its tag stays reserved).
    three = start(3) + cancel(1)
    limit_body = lambda n: b"\x00\x00\x00" + b"m" * (n - 3)  # an Ok Rdispatch body of n bytes
    session_seeds = {
        "replies": session(0, three, RDISPATCH + rdispatch(4) + frame(0xBE, 3, b"")),
        "errors": session(0, three, ERROR + NACK + frame(0x7F, 2, b"no") + frame(0xFE, 3, b"\x00\x00\x00")),
        # Rdispatch Error with MuxFailure flags on tags 2..7: Retryable, Rejected, both (kNack);
        # NonRetryable with Retryable, with Rejected, and no flag (kServerError).
        "errors_flagged": session(0, start(6), b"".join(flagged_error(2 + i, f, b"flags %d" % f)
                                                         for i, f in enumerate((1, 2, 3, 5, 6, 0)))),
        "control": session(0, three, TPING + TLEASE + RPING + TDISCARDED + TDRAIN + RDISPATCH),
        "fragments": session(0, three + send_frames(3) + send_frames(2),
                             fragmented(0xFE, 2, b"\x00\x00\x00" + ECHO_REPLY, 5) + ERROR),
        "headers": session(0, start(1), RDISPATCH_HEADERS),
        "stray_fragments": session(0, start(1), fragmented(0xFE, 9, b"\x00\x00\x00" + ECHO_REPLY, 8)[:30] + RDISPATCH),
        "server_dispatch": session(0, three, TDISPATCH),
        "handshake": session(HANDSHAKE, send_frames() + send_frames() + start(1), PROBE + RINIT + RDISPATCH),
        "handshake_framer": session(HANDSHAKE, send_frames(2) + start(2) + cancel(0), PROBE + RINIT_FRAMER16 + TPING
                                    + rdispatch(3)),
        "handshake_old_server": session(HANDSHAKE, send_frames() + start(1),
                                        frame(0x7F, 1, b"Unexpected mux message type 127") + RDISPATCH),
        "handshake_rejected": session(HANDSHAKE, b"", PROBE + frame(0x7F, 1, b"version")),
        "handshake_tls_required": session(HANDSHAKE, send_frames(2) + start(1),
                                          PROBE + frame(0xBC, 1, b"\x00\x01" + s4(b"tls") + s4(b"required"))),
        "handshake_timeout": session(HANDSHAKE, send_frames() + advance(6) + start(1) + advance(5), PROBE),
        # Tping and Tdrain (tag 1, §1.8) during the handshake: before the probe's answer and
        # before Rinit. A Tping is answered (before the probe's answer it opens an un-negotiated
        # session); a Tdrain is answered and fails the open (kNack), whatever follows it.
        "handshake_tping_before_probe": session(HANDSHAKE, send_frames() + send_frames() + start(1),
                                                TPING + PROBE + RDISPATCH),
        "handshake_tdrain_before_probe": session(HANDSHAKE, send_frames(2) + start(1), TDRAIN + PROBE + RINIT),
        # A Tdrain's non-final fragment behind a Tdrain (one read): ignored, the open fails with
        # kNack (it failed with kProtocolError; found by this target).
        "handshake_tdrain_fragment": session(HANDSHAKE, send_frames(3) + start(1),
                                             TDRAIN + frame(0x40, 1, b"x", fragment=True) + RINIT),
        "handshake_tping_before_rinit": session(HANDSHAKE, send_frames() + send_frames(2) + start(1),
                                                PROBE + TPING + RINIT + RDISPATCH),
        "handshake_tdrain_before_rinit": session(HANDSHAKE, send_frames() + send_frames(3) + start(1),
                                                 PROBE + TPING + TDRAIN + RINIT),
        "pings": session(PINGS, start(1) + advance(10) + send_frames() + advance(10) + advance(3) + send_frames()
                         + advance(10), RPING + RPING),
        "ping_timeout": session(PINGS, start(2) + advance(10) + advance(5), RDISPATCH),
        "ping_handshake": session(HANDSHAKE | PINGS, send_frames(2) + advance(10) + start(1) + advance(5),
                                  PROBE + RINIT),
        "discard_limit": session(TINY, start(4) + cancel(0) + cancel(0) + cancel(0), RDISPATCH),
        "discard_answered": session(TINY, start(2) + cancel(0) + send_frames() + start(1) + cancel(1) + send_frames(),
                                    frame(0xBE, 2, b"") + frame(0x7F, 3, b"late") + rdispatch(2)),
        "followups": session(FOLLOW, start(2) + send_frames(2) + send_frames(1) + cancel(0) + EOF_NOW,
                             RDISPATCH + rdispatch(2, b"dup") + rdispatch(2, b"second") + rdispatch(3)),
        "followups_close": session(FOLLOW, start(3) + send_frames(2), rdispatch(3) + frame(0x02, 2, b"")),
        "followups_cancelled": session(FOLLOW | CANCEL_FOLLOW, start(2) + send_frames(2) + send_frames(),
                                       RDISPATCH + rdispatch(2, b"not yet written") + rdispatch(2, b"later")),
        "followups_cancelled_on_cancel": session(FOLLOW | CANCEL_FOLLOW | TINY, start(2) + cancel(0) + send_frames(),
                                                 frame(0xBE, 2, b"") + rdispatch(3)),
        "drain": session(0, start(1) + send_frames() + start(1) + send_frames(), TDRAIN + RDISPATCH),
        "drain_ping_burst": session(TINY, send_frames(5), TDRAIN + TPING + TPING + TPING + TPING),
        "frame_at_limit": session(0, start(1), rdispatch(2, b"f" * (512 - 4 - 3))),
        "frame_over_limit": session(0, start(1), rdispatch(2, b"f" * (512 - 4 - 2))),
        "reassembled_at_limit": session(0, start(1) + send_frames(), fragmented(0xFE, 2, limit_body(64), 20)),
        "reassembled_over_limit": session(0, start(1), fragmented(0xFE, 2, limit_body(65), 20)),
        "first_fragment_over_limit": session(0, start(1), frame(0xFE, 2, limit_body(65), fragment=True) + RDISPATCH),
        "reassembled_unknown_tag": session(0, start(1), fragmented(0xFE, 7, limit_body(200), 60) + RDISPATCH),
        "eof_early": session(0, start(2) + EOF_NOW, RDISPATCH),
        "bytewise": session(0, start(2) + send_bytes(3) * 20, RDISPATCH + rdispatch(3)),
    }
    for name, data in session_seeds.items():
        write("mux_session_fuzzer", name, data)

    def binary_reply(name, typ, seqid, body):
        return b"\x80\x01\x00" + bytes([typ]) + s4(name) + struct.pack(">i", seqid) + body

    COMPACT_EXCEPTION = b"\x82\x61\x01\x04echo"  # compact EXCEPTION header, before its struct

    thrift = {
        "binary_reply": binary_reply(b"echo", 2, 1, b"\x0b\x00\x00" + s4(b"hi") + b"\x00"),
        "binary_exception": binary_reply(b"echo", 3, 1, b"\x0b\x00\x01" + s4(b"boom") + b"\x08\x00\x02\x00\x00\x00\x06\x00"),
        "binary_wrong_seqid": binary_reply(b"echo", 2, 7, b"\x00"),
        "binary_bad_type": binary_reply(b"echo", 5, 1, b"\x00"),
        "binary_nested": binary_reply(b"echo", 2, 1, b"\x0c\x00\x00\x0f\x00\x01\x0b\x00\x00\x00\x01" + s4(b"x")
                                       + b"\x0d\x00\x02\x08\x0b\x00\x00\x00\x01\x00\x00\x00\x01" + s4(b"y") + b"\x00\x00"),
        "lenient_reply": s4(b"echo") + b"\x02" + struct.pack(">i", 1) + b"\x0b\x00\x00" + s4(b"hi") + b"\x00",
        "compact_reply": b"\x82\x41\x01\x04echo\x18\x02hi\x00",
        "compact_exception": b"\x82\x61\x01\x04echo\x1c\x18\x04boom\x15\x0c\x00\x00",
        "compact_containers": b"\x82\x41\x01\x04echo\x09\x28\x01a\x01b\x1b\x02\x58\x02\x02k\x02v\x02x\x00\x00",
        # Unknown fields (id 5, which the client skips through CheckedReads) in a compact
        # exception: a string declaring 2^31-1 bytes; lists and structs nested 63 deep in the
        # exception struct (64 levels, the most that decodes) and 64 deep; then types TCompactProtocol
        # does not know (13 to 15) in a field header, a list header and a map header.
        "compact_unknown_huge_string": COMPACT_EXCEPTION + b"\x58\xff\xff\xff\xff\x07xyz\x00",
        "compact_unknown_lists_63": COMPACT_EXCEPTION + b"\x59" + b"\x19" * 62 + b"\x05\x00",
        "compact_unknown_lists_64": COMPACT_EXCEPTION + b"\x59" + b"\x19" * 63 + b"\x05\x00",
        "compact_unknown_structs_63": COMPACT_EXCEPTION + b"\x5c" + b"\x1c" * 62 + b"\x00" * 64,
        "compact_unknown_structs_64": COMPACT_EXCEPTION + b"\x5c" + b"\x1c" * 63 + b"\x00" * 65,
        "compact_type_13": COMPACT_EXCEPTION + b"\x1d\x00",
        "compact_list_type_14": COMPACT_EXCEPTION + b"\x59\x1e\x00",
        "compact_map_type_15": COMPACT_EXCEPTION + b"\x5b\x01\xf5\x00",
        "binary_unknown_huge_string": binary_reply(b"echo", 2, 1, b"\x0b\x00\x05\x7f\xff\xff\xffxyz\x00"),
    }
    for name, data in thrift.items():
        write("thrift_reply_fuzzer", name, data)

    # Thrift transport: byte 0 = flags (bit 0 buffered, bit 1 the server keeps the connection
    # open, bit 2 a oneway call, bits 4-7 the write size; see thrift_transport_fuzzer.cc). The
    # call is echo, sequence id 1; the target's max_frame_bytes is 64.
    BUFFERED, T_KEEP, ONEWAY = 0x01, 0x02, 0x04

    def echo_reply(seqid=1, text=b"hi"):
        return binary_reply(b"echo", 2, seqid, b"\x0b\x00\x00" + s4(text) + b"\x00")

    def framed(msg):
        return struct.pack(">I", len(msg)) + msg

    reply = echo_reply()
    at_limit = echo_reply(text=b"h" * (2 + 64 - len(reply)))
    over_limit = echo_reply(text=b"h" * (3 + 64 - len(reply)))
    assert len(at_limit) == 64 and len(over_limit) == 65
    transport = {
        "framed_ok": bytes([T_KEEP]) + framed(reply),
        "framed_ok_bytewise": bytes([T_KEEP | (1 << 4)]) + framed(reply),
        "framed_len0": b"\x00" + struct.pack(">I", 0),
        "framed_at_limit": bytes([T_KEEP | (4 << 4)]) + framed(at_limit),
        "framed_over_limit": b"\x00" + framed(over_limit),
        "framed_huge_length": b"\x00" + struct.pack(">I", 0x7FFFFFFF) + reply,
        "framed_wrong_seqid": bytes([T_KEEP]) + framed(echo_reply(seqid=7)),
        "framed_short": b"\x00" + framed(reply)[:14],
        "framed_trailing": bytes([T_KEEP]) + framed(reply) + b"\x00\x00",
        "framed_not_thrift": bytes([T_KEEP]) + framed(b"hello"),
        "buffered_ok": bytes([BUFFERED | T_KEEP]) + reply,
        "buffered_bytewise": bytes([BUFFERED | T_KEEP | (1 << 4)]) + reply,
        "buffered_at_limit": bytes([BUFFERED | T_KEEP | (6 << 4)]) + at_limit,
        "buffered_over_limit": bytes([BUFFERED]) + over_limit,
        "buffered_over_limit_bytewise": bytes([BUFFERED | (1 << 4)]) + over_limit,
        "buffered_malformed": bytes([BUFFERED]) + binary_reply(b"echo", 2, 1, b"\x11\x00\x00"),
        "buffered_wrong_seqid": bytes([BUFFERED | T_KEEP]) + echo_reply(seqid=-1),
        "buffered_incomplete": bytes([BUFFERED | T_KEEP | (3 << 4)]) + reply[:20],
        "buffered_compact": bytes([BUFFERED | T_KEEP]) + b"\x82\x41\x01\x04echo\x18\x02hi\x00",
        # Unknown field 5 (skipped by the typed client, not by the transport): a string declaring
        # 2^31-1 bytes, framed (whole to the transport) and buffered (the scan needs more); a
        # compact field of type 13, buffered (malformed to the scan).
        "framed_unknown_huge_string": bytes([T_KEEP]) + framed(
            binary_reply(b"echo", 2, 1, b"\x0b\x00\x05\x7f\xff\xff\xffxyz\x00")),
        "buffered_unknown_huge_string": bytes([BUFFERED]) + binary_reply(
            b"echo", 2, 1, b"\x0b\x00\x05\x7f\xff\xff\xffxyz\x00"),
        "buffered_compact_type_13": bytes([BUFFERED]) + b"\x82\x41\x01\x04echo\x1d\x00",
        "buffered_trailing": bytes([BUFFERED | T_KEEP]) + reply + reply,
        "oneway": bytes([ONEWAY | T_KEEP]),
        "oneway_answered": bytes([ONEWAY | T_KEEP]) + framed(reply),
    }
    for name, data in transport.items():
        write("thrift_transport_fuzzer", name, data)

    # HTTP: byte 0 = flags (bit 0 HEAD, bit 1 the server keeps the connection open, bit 2
    # raise_on_http_error, bits 4-7 the write size; see http_response_fuzzer.cc). The target's
    # limits: a 96-byte header block, a 128-byte body.
    http_header_limit, http_body_limit = 96, 128

    def http_head(total, status=b"HTTP/1.1 200 OK", fields=b""):
        """A header block of exactly `total` bytes (blank line included), padded by an X-Pad field."""
        base = status + b"\r\n" + fields + b"X-Pad: \r\n\r\n"
        assert total >= len(base), (total, base)
        return status + b"\r\n" + fields + b"X-Pad: " + b"p" * (total - len(base)) + b"\r\n\r\n"

    def chunked(body, size=16):
        out = b""
        for off in range(0, len(body), size):
            piece = body[off:off + size]
            out += b"%x\r\n" % len(piece) + piece + b"\r\n"
        return out + b"0\r\n\r\n"

    KEEP, RAISE = 0x02, 0x04

    def chunk(n):  # bits 4-7: index into the target's kChunks
        return {0: 0, 1: 1, 2: 2, 3: 3, 5: 4, 7: 5, 8: 6, 13: 7, 16: 8, 21: 9, 32: 10}[n] << 4

    te = b"Transfer-Encoding: chunked\r\n"
    cl = lambda n: b"Content-Length: %d\r\n" % n
    http = {
        "ok": b"\x00HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nhi",
        "chunked": bytes([KEEP]) + b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n3;x=y\r\nyou\r\n0\r\nT: 1\r\n\r\n",
        "close_delimited": b"\x00HTTP/1.0 200 OK\r\nConnection: close\r\n\r\nbody until close",
        "not_found": bytes([RAISE]) + b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\n\r\nnot found",
        "head": b"\x01HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n",
        "no_content": b"\x00HTTP/1.1 204 No Content\r\n\r\n",
        "huge_length": b"\x00HTTP/1.1 200 OK\r\nContent-Length: 2147483648\r\n\r\nxx",
        "trailing_bytes": b"\x00HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\nHTTP/1.1 200 OK\r\n",
        # Kept open: a keep-alive response, then a second request on the connection.
        "keep_alive": bytes([KEEP | chunk(7)]) + b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
        "keep_alive_chunked": bytes([KEEP | chunk(3)]) + b"HTTP/1.1 200 OK\r\n" + te + b"\r\n" + chunked(b"x" * 40, 7),
        "keep_alive_trailing": bytes([KEEP | chunk(16)]) + b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhiHTTP/1.1",
        "keep_alive_error": bytes([KEEP | RAISE]) + b"HTTP/1.1 503 Busy\r\nContent-Length: 4\r\n\r\nbusy",
        "keep_open_partial": bytes([KEEP | chunk(5)]) + b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\nnot all",
        "interim": bytes([KEEP]) + b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
                   b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        "interim_too_many": b"\x00" + b"HTTP/1.1 100 Continue\r\n\r\n" * 9 + b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        "switching": b"\x00HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n",
        "head_keep_alive": bytes([0x01 | KEEP]) + b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n",
        # Failures that leave no byte unread: nothing but the failure closes the connection.
        "keep_open_body_over_header_only": bytes([KEEP]) + b"HTTP/1.1 200 OK\r\n" + cl(http_body_limit + 1) + b"\r\n",
        "keep_open_bad_status": bytes([KEEP | chunk(8)]) + b"HTTP/1.1 2x0 OK\r\n\r\n",
        # Framing Beast lets through (review, 2026-12-05): a Content-Length after another
        # coding (refused), an HTTP/1.0 response with Transfer-Encoding (not reused), trailer
        # fields (not headers), a status under 100 (a final response, a server error).
        "te_then_cl": bytes([KEEP]) + b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nContent-Length: 2\r\n\r\nhi",
        "http10_te_keep_alive": bytes([KEEP]) + b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\n" + te + b"\r\n0\r\n\r\n",
        "trailer_fields": bytes([KEEP | chunk(5)]) + b"HTTP/1.1 200 OK\r\n" + te + b"\r\n2\r\nhi\r\n0\r\nSet-Cookie: a=b\r\n\r\n",
        "status_under_100": bytes([KEEP | RAISE]) + b"HTTP/1.1 099 Odd\r\nContent-Length: 0\r\n\r\n",
    }
    # Header block limit (96 bytes, blank line included): just under, at, just over; in one
    # write and byte by byte; for the fast path (Content-Length) and for Beast (chunked); and
    # an interim response's block at the limit.
    for total in (http_header_limit - 1, http_header_limit, http_header_limit + 1):
        tag = {http_header_limit - 1: "under", http_header_limit: "at", http_header_limit + 1: "over"}[total]
        http["header_%s" % tag] = bytes([KEEP]) + http_head(total, fields=cl(2)) + b"ok"
        http["header_%s_bytewise" % tag] = bytes([KEEP | chunk(1)]) + http_head(total, fields=cl(2)) + b"ok"
        http["header_%s_chunked" % tag] = bytes([KEEP | chunk(8)]) + http_head(total, fields=te) + chunked(b"ok")
        http["header_%s_interim" % tag] = (bytes([KEEP | chunk(13)]) + http_head(total, b"HTTP/1.1 100 Continue")
                                           + b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    http["header_never_ends"] = bytes([KEEP | chunk(21)]) + b"HTTP/1.1 200 OK\r\nX-Long: " + b"v" * 300
    # Body limit (128 bytes): Content-Length, chunked and close-delimited, at and over.
    for n, tag in ((http_body_limit, "at"), (http_body_limit + 1, "over")):
        http["body_%s" % tag] = bytes([KEEP]) + b"HTTP/1.1 200 OK\r\n" + cl(n) + b"\r\n" + b"b" * n
        http["body_%s_chunked" % tag] = bytes([KEEP | chunk(32)]) + b"HTTP/1.1 200 OK\r\n" + te + b"\r\n" + chunked(b"b" * n, 50)
        http["body_%s_close" % tag] = b"\x00HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + b"b" * n
    # The bounds on what Beast keeps unconsumed after the header: a chunk-size line (with
    # extensions) and a trailer section longer than the header limit, arriving in pieces.
    http["chunk_line_long"] = (bytes([KEEP | chunk(16)]) + b"HTTP/1.1 200 OK\r\n" + te + b"\r\n2;ext=" + b"e" * 120
                               + b"\r\nhi\r\n0\r\n\r\n")
    http["chunk_line_just_under"] = (bytes([KEEP | chunk(8)]) + b"HTTP/1.1 200 OK\r\n" + te + b"\r\n2;e=" + b"e" * 84
                                     + b"\r\nhi\r\n0\r\n\r\n")
    http["trailer_long"] = (bytes([KEEP | chunk(16)]) + b"HTTP/1.1 200 OK\r\n" + te + b"\r\n2\r\nhi\r\n0\r\nT: "
                            + b"t" * 120 + b"\r\n\r\n")
    # A header block just under the limit whose final chunk arrives in the same read as the
    # header, its trailer's end in a later one: the parser must not be given the same bytes
    # again after need_more (a Beast assertion; found by CI's fuzz run, 2026-12-05).
    http["final_chunk_after_header"] = (b"bHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Pad: " + b"p" * 20
                                        + b"\r\n\r\n0\r\nok\r\nppppppppp\r\n\r\n3\r\nok\r\n0\r\n\r\n")
    # An empty chunked body byte by byte: Beast keeps "0\r\n" unconsumed and asserts that the
    # next put() gives it five bytes or more ("0\r\n\r" is four; found by a review, 2026-12-05).
    http["final_chunk_bytewise"] = bytes([KEEP | chunk(1)]) + b"HTTP/1.1 200 OK\r\n" + te + b"\r\n0\r\n\r\n"
    http["final_chunk_trailer_bytewise"] = (bytes([KEEP | chunk(1)]) + b"HTTP/1.1 200 OK\r\n" + te
                                            + b"\r\n2\r\nok\r\n0\r\nT: 1\r\n\r\n")
    for name, data in http.items():
        write("http_response_fuzzer", name, data)

    # Admin requests: byte 0 = flags (bit 0 the client keeps its end open, bit 1 the clients
    # page throws, bits 4-7 the write size; see admin_request_fuzzer.cc). The target's limits:
    # a 128-byte header block, a 64-byte body.
    admin_header_limit, admin_body_limit = 128, 64
    OPEN, THROWS = 0x01, 0x02

    def admin_get(total, target=b"/metrics"):
        """A GET whose header block is exactly `total` bytes, padded by an X-Pad field."""
        base = b"GET " + target + b" HTTP/1.1\r\nX-Pad: \r\n\r\n"
        assert total >= len(base), (total, base)
        return b"GET " + target + b" HTTP/1.1\r\nX-Pad: " + b"p" * (total - len(base)) + b"\r\n\r\n"

    admin = {
        "get_pages": b"\x00" + b"".join(b"GET %s HTTP/1.1\r\nHost: a\r\n\r\n" % t for t in (
            b"/", b"/admin", b"/metrics", b"/admin/metrics.json", b"/admin/clients?x=1", b"/nope")),
        "head_pages": bytes([OPEN | chunk(7)]) + b"HEAD /metrics HTTP/1.1\r\n\r\nHEAD /missing HTTP/1.1\r\n\r\n",
        "clients_throw": bytes([THROWS]) + b"GET /admin/clients HTTP/1.1\r\n\r\nGET /admin/clients HTTP/1.0\r\n\r\n",
        "post_with_body": bytes([OPEN]) + b"POST /metrics HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcGET / HTTP/1.1\r\n\r\n",
        "http10": b"\x00GET /metrics HTTP/1.0\r\n\r\nGET / HTTP/1.1\r\n\r\n",
        "http10_keep_alive": bytes([OPEN | chunk(2)]) + b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
        "connection_close": bytes([OPEN]) + b"GET / HTTP/1.1\r\nConnection: close\r\n\r\nGET / HTTP/1.1\r\n\r\n",
        "partial": bytes([OPEN | chunk(5)]) + b"GET / HTTP/1.1\r\n\r\nGET /metrics HTTP/1.1\r\nHo",
        "garbage_after": b"\x00GET / HTTP/1.1\r\n\r\nnot http\r\n\r\n",
        "odd_versions": b"\x00GET / HTTP/1.2\r\n\r\nGET / HTTP/2.0\r\n\r\nGET / HTTP/0.9\r\n\r\n",
        "chunked_body": bytes([OPEN | chunk(3)]) + b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                        b"3;x=y\r\nabc\r\n0\r\nT: 1\r\n\r\nGET / HTTP/1.1\r\n\r\n",
        "options_star": bytes([OPEN]) + b"OPTIONS * HTTP/1.1\r\n\r\nGET * HTTP/1.1\r\n\r\n",
        # A chunk-size line (with extensions) and a trailer section longer than the header
        # limit: Beast bounds neither.
        "chunk_line_long": bytes([OPEN | chunk(16)]) + b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1;e="
                           + b"e" * 200 + b"\r\nx\r\n0\r\n\r\n",
        "trailer_long": bytes([OPEN | chunk(21)]) + b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\nT: "
                        + b"t" * 200 + b"\r\n\r\n",
        # An empty chunked body byte by byte (the same Beast assertion as the HTTP client's).
        "chunked_last_chunk_bytewise": bytes([OPEN | chunk(1)]) + b"POST / HTTP/1.1\r\n" + te + b"\r\n0\r\n\r\n"
                                       b"GET / HTTP/1.1\r\n\r\n",
        # A malformed (empty) chunk-size line byte by byte, the client keeping its end open: the
        # session must refuse it at once, not wait for a last chunk (found by CI's fuzz run).
        "chunk_line_empty_bytewise": bytes([OPEN | chunk(1)]) + b"POST / HTTP/1.1\r\n" + te + b"\r\n\r\n",
        # A long request line with short fields: the block over the limit, each part under it.
        "request_line_long": bytes([OPEN]) + b"GET /" + b"l" * 100 + b" HTTP/1.1\r\nA: " + b"a" * 60 + b"\r\n\r\n",
        # A request line that does not end within the limit (414, not 431).
        "request_line_over": bytes([OPEN | chunk(16)]) + b"GET /" + b"l" * 130 + b" HTTP/1.1\r\n\r\n",
        # Targets in absolute form and escaped paths are served; bad escapes, an escaped '/' or
        # NUL and other forms are refused (400), a HEAD's refusal without its text.
        "absolute_form": bytes([OPEN]) + b"GET http://127.0.0.1:9990/metrics?x HTTP/1.1\r\n\r\n"
                         b"HEAD HTTPS://a HTTP/1.1\r\n\r\nGET http://a/admin/%63lients HTTP/1.1\r\n\r\n",
        "escaped_paths": bytes([OPEN]) + b"GET /%6detrics HTTP/1.1\r\n\r\nGET /metrics%3Fx HTTP/1.1\r\n\r\n"
                         b"GET /admin%2fclients HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\n\r\n",
        "bad_escape": bytes([OPEN]) + b"GET /admin/%6 HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\n\r\n",
        "escaped_nul_head": bytes([OPEN]) + b"HEAD /metrics%00 HTTP/1.1\r\n\r\n",
        "other_form": b"\x00GET ftp://a/metrics HTTP/1.1\r\n\r\n",
        # Transfer-codings besides chunked (501), and chunked not last (400).
        "coding_gzip_chunked": bytes([OPEN]) + b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n"
                               b"Transfer-Encoding: chunked\r\n\r\n1\r\nb\r\n0\r\n\r\n",
        "coding_gzip": bytes([OPEN]) + b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\nb",
        # Dot-segments are removed from the decoded path (RFC 3986 5.2.4), %2E being a '.'.
        "dot_segments": bytes([OPEN]) + b"GET /stats/../metrics HTTP/1.1\r\n\r\nGET /./admin/%2E%2e/admin/clients HTTP/1.1\r\n\r\n"
                        b"HEAD /../ HTTP/1.1\r\n\r\nGET /admin/clients/.. HTTP/1.1\r\n\r\n",
        # The client's end of stream in the middle of a request: 400 (a HEAD's without its text).
        "half_close_in_header": b"\x00GET / HTTP/1.1\r\n\r\nGET /metrics HTTP/1.1\r\nHo",
        "half_close_in_body_head": bytes([chunk(8)]) + b"HEAD / HTTP/1.1\r\nContent-Length: 5\r\n\r\nab",
        # Empty lines before a request line are ignored (RFC 9112 2.2), also CR and LF apart;
        # alone they are no request (end of stream: a silent close, no 400); they count towards
        # the header limit: 62 CRLFs leave 4 bytes of it, 64 reach it.
        "empty_lines_before": bytes([OPEN | chunk(1)]) + b"\r\n\r\nGET /metrics HTTP/1.1\r\n\r\n\r\nGET / HTTP/1.1\r\n\r\n",
        "empty_lines_only": b"\x00GET / HTTP/1.1\r\n\r\n\r\n\r\n\r",
        "empty_lines_near_limit": bytes([OPEN]) + b"\r\n" * 55 + b"GET / HTTP/1.1\r\n\r\n",
        "empty_lines_over_limit": bytes([OPEN]) + b"\r\n" * 62 + b"GET / HTTP/1.1\r\n\r\n",
        "empty_lines_at_limit": b"\x00" + b"\r\n" * 70,
    }
    # Header block limit: just under, at, just over; in one write and byte by byte.
    for total, tag in ((admin_header_limit - 1, "under"), (admin_header_limit, "at"), (admin_header_limit + 1, "over")):
        admin["header_%s" % tag] = bytes([OPEN]) + admin_get(total) + b"GET / HTTP/1.1\r\n\r\n"
        admin["header_%s_bytewise" % tag] = bytes([OPEN | chunk(1)]) + admin_get(total)
    # Body limit: Content-Length and chunked, at and over.
    for n, tag in ((admin_body_limit, "at"), (admin_body_limit + 1, "over")):
        admin["body_%s" % tag] = bytes([OPEN]) + b"POST / HTTP/1.1\r\n" + cl(n) + b"\r\n" + b"b" * n + b"GET / HTTP/1.1\r\n\r\n"
        admin["body_%s_chunked" % tag] = (bytes([OPEN | chunk(13)]) + b"POST / HTTP/1.1\r\n" + te + b"\r\n"
                                          + chunked(b"b" * n, 20))
    for name, data in admin.items():
        write("admin_request_fuzzer", name, data)

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
            "tcp://[fe80::1%eth0]:80", "zk://a:1/svc?k=a=b", "TCP://a:1/whatever", "tcp://a:99999",
            # ZooKeeperOptions::FromUri: every option, and bad values.
            "zk://a:1,[::1]:2/svc#http?session_timeout=1500ms&retry_interval=2m&chroot=/prod&auth=digest:u:p:w",
            "zk://a:1/svc?session_timeout=0s&auth=digest", "zk://a:1/svc?chroot=/x/&tls=on&opportunistic_tls=desired",
            "https://a?tls_ca_file=/ca.pem", "1440m",
            # Percent-decoded query values: escapes, a malformed one, an escaped control character.
            "zk://a:1/svc?auth=digest:u:p%26ss%20%23%25x&retry_interval=10ms",
            "tcp://a:1?tls=on&tls_ca_file=/c%G1.pem", "zk://a:1/svc?chroot=/x%00y"]
    for i, u in enumerate(uris):
        write("uri_fuzzer", "uri%d" % i, u.encode())


if __name__ == "__main__":
    main()
