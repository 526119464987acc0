#!/usr/bin/python3
"""Mux / ThriftMux reference server for the scales integration tests.

Written from ../shared/mux-protocol.md, independently of the C++ codec: it shares no code with
src/mux/. Serves the Echo service of tools/echo.thrift (Thrift strict binary payloads carried in
Tdispatch/Rdispatch), generating the Python Thrift code with `thrift --gen py` into a temporary
directory at start-up. Run it with Debian's /usr/bin/python3 (python3-thrift).

Modes:
  finagle  echoes the "tinit check" probe (Rerr 0x7F), answers Tinit with Rinit, works without
           Tinit, never pings, answers Tping, answers Tdiscarded for a pending tag with Rdiscarded.
  strict   like elixir-mux: Nacks dispatches until Tinit, pings the client every --ping-interval
           ms after the handshake, fragments replies at --framer bytes (advertised in Rinit).
  old      an old Finagle server: answers the probe (and Tinit) with
           Rerr "Unexpected mux message type N", then serves Tdispatch normally.

Misbehaviours on demand, chosen by the argument of echo():
  "drain"            reply, then Tdrain (tag 1); after Rdrain close once outstanding work is done
  "drain-stalled:A:B"  stop reading from the connection; A milliseconds later reply and send
                     Tdrain (tag 1); resume reading B milliseconds after the stop: the client's
                     writes of the meantime are still in flight when it is told to drain
  "lease:MS"         send Tlease of MS milliseconds, then reply
  "nack"             Rdispatch Nack with MuxFailure = Retryable|Rejected
  "nack-final"       Rdispatch Nack with MuxFailure = Rejected|NonRetryable (Finagle's
                     NonRetryableNackFailure)
  "error:TEXT"       Rdispatch Error TEXT
  "error-flags:F:TEXT"  Rdispatch Error TEXT with a MuxFailure context of flags F (decimal: 1
                     Retryable, 2 Rejected, 4 NonRetryable; 0 sends the context with no flag)
  "rerr:TEXT"        Rerr TEXT on the request's tag
  "noreply"          never reply (Tdiscarded still answered with Rdiscarded)
  "garbage"          write a frame with an invalid type byte (0x12), keep the connection
  "close-mid-frame"  write half of the reply frame and close the connection
  "hang-up"          end the connection at once, abruptly (no TLS close_notify), no reply
  "contexts"         reply with the received context keys, comma-separated
  "trace"            reply "trace=T span=S parent=P flags=F" (16 hex digits each) decoded from
                     the TraceContext context, or "no trace"; a 40-byte context (128-bit trace
                     id) appends " high=H" (traceIdHigh, 16 hex digits)
  "tls-info"         reply "tls=VERSION peer=CN reused=yes|no" for a TLS connection (VERSION
                     as Python's ssl reports it, e.g. TLSv1.3; CN of the client certificate, or
                     "none"; reused: the handshake resumed a session), or "tls=none" for a
                     plaintext one: proof that the bytes were encrypted
Hostile peers (bounded-resource tests, tests/integration/hostile_peer_test.cc):
  "huge-frame"       write a frame header whose size field is 2 GiB (0x80000000), then 4 KiB of
                     its body, and keep the connection open
  "endless-fragments"  write Rdispatch fragments (16 KiB bodies, fragment bit always set) on the
                     request's tag until the client closes the connection (or 1 GiB was sent)
  "drip:MS"          write the reply frame one byte every MS milliseconds; nothing else is
                     written meanwhile and Tdiscarded does not stop it (the frame is finished)
  "stray-fragments"  write 960 KiB of Rdispatch fragments on each of the 96 tags 1000..1095
                     (no request uses them; never finished), then reply normally
  "ping-flood"       stop reading from the connection and write Tping frames (tag 1) until the
                     client closes it (or 256 MiB were sent): a peer that makes the client
                     queue Rping replies it can never write
  "ping-burst:N"     write N Tping frames (tag 1) and then the reply, all in one write, and keep
                     reading: a healthy peer whose pings arrive in one read with the reply
  "drain-ping-burst:N"  write Tdrain (tag 1), N Tping frames (tag 1) and then the reply, all in
                     one write: a draining peer that reads, whose pings come with its drain
  "duplicate-reply"  write the reply frame twice in one write (a buggy server answering a tag
                     twice): the second must not answer the client's next request on that tag
  "stall"            stop reading from the connection and never reply: the client's writes
                     fill the socket buffers and then queue in the client
  "reset-stalled"    reset (RST: SO_LINGER 0, then close) every connection that got "stall",
                     then reply "reset N" on this one
sleep(MS) answers str(MS) after MS milliseconds (replies out of order). Request headers
(com.twitter.finagle.thrift.Request.headers) are echoed back as response headers.

TLS (Python's ssl module, independent of the C++ TLS code): --tls-cert FILE --tls-key FILE
[--tls-client-ca FILE] with --tls-mode
  first-byte  the listening socket is TLS: the handshake comes before any Mux byte
  off | desired | required
              opportunistic TLS (mux-protocol.md 1.7): Rinit carries tls=<mode>; when the
              client's Tinit `tls` header (absent = off) and the mode agree on TLS, the
              server wraps the socket right after sending Rinit; off against required sends
              Rinit and closes the connection. A client that never sends Tinit stays plaintext.
--tls-client-ca FILE requires a client certificate signed by that CA (mutual TLS).
Without --tls-mode the server is plaintext and answers tls=off.

--greet tping|tdrain writes that control message (tag 1) as soon as a connection opens, before
reading anything: it reaches the client before the answer to its probe (a server that pings at
once, or that is shutting down as the client connects: "tdrain" also makes the connection drain,
as "drain" does).
--greet-after-tinit tping|tdrain writes it on receiving a Tinit instead, in one write with the
Rinit that still follows it: the client, waiting for Rinit, reads both at once (a server that
pings, or starts shutting down, during the handshake).

--hang-up-on-tinit ends the connection on receiving a Tinit, unanswered and abruptly (no TLS
close_notify): a server that dies, or a network that cuts the connection, mid-handshake.

--fail-first N answers the first N dispatches the server handles (counted over all its
connections) with an Rdispatch Error, then serves normally: a server that fails a call once and
answers its retry. --fail-flags F adds a MuxFailure context of flags F to the errors of
--fail-first and --fail-all (without it they carry no context).

--delay MS makes every dispatch wait MS milliseconds first (a slow server, e.g. for hedging
tests; Tdiscarded cancels the wait).

--log FILE writes one line per received/sent message (flushed), e.g.
  conn=1 recv Tdispatch tag=2 size=83 contexts=com.twitter.finagle.Deadline method=echo
  conn=1 recv Tdiscarded tag=0 which=2 why=timeout
Prints "listening 127.0.0.1:<port>" on stdout once it accepts connections.
"""

import argparse
import asyncio
import os
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile

# --- Wire constants (mux-protocol.md §1.2). ---------------------------------------------------

TREQ, RREQ = 0x01, 0xFF
TDISPATCH, RDISPATCH = 0x02, 0xFE
TDRAIN, RDRAIN = 0x40, 0xC0
TPING, RPING = 0x41, 0xBF
TDISCARDED, TDISCARDED_LEGACY, RDISCARDED = 0x42, 0xC2, 0xBE
TLEASE = 0x43
TINIT, RINIT = 0x44, 0xBC
RERR, RERR_LEGACY = 0x80, 0x7F

NAMES = {
    TREQ: "Treq", RREQ: "Rreq", TDISPATCH: "Tdispatch", RDISPATCH: "Rdispatch",
    TDRAIN: "Tdrain", RDRAIN: "Rdrain", TPING: "Tping", RPING: "Rping",
    TDISCARDED: "Tdiscarded", TDISCARDED_LEGACY: "Tdiscarded", RDISCARDED: "Rdiscarded",
    TLEASE: "Tlease", TINIT: "Tinit", RINIT: "Rinit", RERR: "Rerr", RERR_LEGACY: "Rerr",
}

FRAGMENT = 0x800000
TAG_MASK = 0x7FFFFF
PROBE = b"tinit check"
UNLIMITED = 0x7FFFFFFF

KEY_CLIENT_ID = b"com.twitter.finagle.thrift.ClientIdContext"
KEY_DEADLINE = b"com.twitter.finagle.Deadline"
KEY_RETRIES = b"com.twitter.finagle.Retries"
KEY_TRACE = b"com.twitter.finagle.tracing.TraceContext"
KEY_REQ_HEADERS = b"com.twitter.finagle.thrift.Request.headers"
KEY_RESP_HEADERS = b"com.twitter.finagle.thrift.Response.headers"
KEY_MUX_FAILURE = b"MuxFailure"

STATUS_OK, STATUS_ERROR, STATUS_NACK = 0, 1, 2

TLS_LEVELS = ("off", "desired", "required")


def tls_outcome(ours, theirs):
    """The opportunistic TLS outcome table of mux-protocol.md 1.7: "tls", "plaintext" or
    "incompatible" (off against required, either way)."""
    if "off" in (ours, theirs):
        return "incompatible" if "required" in (ours, theirs) else "plaintext"
    return "tls"


def make_ssl_context(args):
    """The server's TLS context (None without --tls-cert)."""
    if not args.tls_cert:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(args.tls_cert, args.tls_key)
    if args.tls_client_ca:  # mutual TLS: a client certificate signed by this CA is required
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(args.tls_client_ca)
    return ctx


def tls_info(writer):
    """"tls=VERSION peer=CN reused=yes|no" or "tls=none" for the connection behind `writer`."""
    ssl_object = writer.get_extra_info("ssl_object")
    if ssl_object is None:
        return "tls=none"
    peer = "none"
    for rdn in (ssl_object.getpeercert() or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                peer = value
    return "tls=%s peer=%s reused=%s" % (ssl_object.version(), peer,
                                         "yes" if ssl_object.session_reused else "no")


def signed_type(t):
    return t - 256 if t >= 128 else t


class ProtocolFault(Exception):
    pass


# --- Thrift Echo service (generated at start-up). ---------------------------------------------

def load_echo_module(thrift_compiler, idl, tmpdir):
    subprocess.run([thrift_compiler, "--gen", "py", "-out", tmpdir, idl], check=True)
    sys.path.insert(0, tmpdir)
    from scales_echo import Echo, ttypes  # noqa: E402  (generated)
    return Echo, ttypes


class EchoCodec:
    """Thrift strict binary (de)serialisation of Echo calls over TMemoryBuffer."""

    def __init__(self, echo_module, ttypes):
        from thrift.protocol import TBinaryProtocol
        from thrift.Thrift import TApplicationException, TMessageType
        from thrift.transport import TTransport
        self.Echo = echo_module
        self.ttypes = ttypes
        self.TBinaryProtocol = TBinaryProtocol
        self.TMemoryBuffer = TTransport.TMemoryBuffer
        self.TMessageType = TMessageType
        self.TApplicationException = TApplicationException

    def decode_call(self, payload):
        """Returns (method, seqid, args object or None)."""
        prot = self.TBinaryProtocol.TBinaryProtocol(self.TMemoryBuffer(payload))
        name, mtype, seqid = prot.readMessageBegin()
        args_cls = getattr(self.Echo, name + "_args", None)
        if args_cls is None:
            return name, seqid, None
        args = args_cls()
        args.read(prot)
        prot.readMessageEnd()
        return name, seqid, args

    def _write(self, name, mtype, seqid, obj):
        buf = self.TMemoryBuffer()
        prot = self.TBinaryProtocol.TBinaryProtocol(buf)  # strict write
        prot.writeMessageBegin(name, mtype, seqid)
        obj.write(prot)
        prot.writeMessageEnd()
        return buf.getvalue()

    def reply(self, name, seqid, success=None, error_message=None):
        result = getattr(self.Echo, name + "_result")()
        if error_message is not None:
            result.error = self.ttypes.EchoError(message=error_message)
        elif success is not None:
            result.success = success
        return self._write(name, self.TMessageType.REPLY, seqid, result)

    def app_exception(self, name, seqid, message):
        exc = self.TApplicationException(self.TApplicationException.UNKNOWN_METHOD, message)
        return self._write(name, self.TMessageType.EXCEPTION, seqid, exc)


# --- Encoding helpers (independent of the C++ codec). -----------------------------------------

def frame(mtype, tag, body=b"", fragment=False):
    t = (tag & TAG_MASK) | (FRAGMENT if fragment else 0)
    return struct.pack(">IB", 4 + len(body), mtype) + t.to_bytes(3, "big") + body


def fragments(mtype, tag, body, max_body):
    """Frames for one message, split at max_body bytes when the type is fragmentable."""
    if mtype not in (TDISPATCH, RDISPATCH) or max_body >= UNLIMITED or len(body) <= max_body:
        return [frame(mtype, tag, body)]
    out = []
    for off in range(0, len(body), max_body):
        piece = body[off:off + max_body]
        out.append(frame(mtype, tag, piece, fragment=off + max_body < len(body)))
    return out


def encode_contexts(contexts):
    out = struct.pack(">H", len(contexts))
    for k, v in contexts:
        out += struct.pack(">H", len(k)) + k + struct.pack(">H", len(v)) + v
    return out


class Reader:
    def __init__(self, what, data):
        self.what, self.data, self.pos = what, data, 0

    def take(self, n, field):
        if self.pos + n > len(self.data):
            raise ProtocolFault("%s: truncated %s at offset %d" % (self.what, field, self.pos))
        v = self.data[self.pos:self.pos + n]
        self.pos += n
        return v

    def u(self, n, field):
        return int.from_bytes(self.take(n, field), "big")

    def prefixed(self, n, field):
        return self.take(self.u(n, field + " length"), field)

    def rest(self):
        v = self.data[self.pos:]
        self.pos = len(self.data)
        return v

    def remaining(self):
        return len(self.data) - self.pos


def decode_tdispatch(body):
    r = Reader("Tdispatch", body)
    contexts = []
    for _ in range(r.u(2, "context count")):
        k = r.prefixed(2, "context key")
        v = r.prefixed(2, "context value")
        contexts.append((k, v))
    dst = r.prefixed(2, "dst")
    dtab = []
    for _ in range(r.u(2, "dtab count")):
        dtab.append((r.prefixed(2, "dtab prefix"), r.prefixed(2, "dtab tree")))
    return contexts, dst, dtab, r.rest()


def decode_init(body):
    r = Reader("Tinit", body)
    version = r.u(2, "version")
    headers = []
    while r.remaining() > 0:
        k = r.prefixed(4, "header key")
        v = r.prefixed(4, "header value")
        headers.append((k, v))
    return version, headers


def decode_headers(value):
    r = Reader("headers", value)
    out = []
    while r.remaining() > 0:
        out.append((r.prefixed(2, "key"), r.prefixed(2, "value")))
    return out


# --- Logging. ---------------------------------------------------------------------------------

class Log:
    def __init__(self, path):
        self.f = open(path, "a", buffering=1) if path else None

    def line(self, text):
        if self.f:
            self.f.write(text + "\n")
            self.f.flush()


def describe_contexts(contexts):
    parts = ["contexts=" + ",".join(k.decode("utf-8", "replace") for k, _ in contexts)]
    for k, v in contexts:
        if k == KEY_CLIENT_ID:
            parts.append("client_id=" + v.decode("utf-8", "replace"))
        elif k == KEY_RETRIES and len(v) == 4:
            parts.append("retries=%d" % struct.unpack(">i", v)[0])
        elif k == KEY_DEADLINE and len(v) == 16:
            ts, dl = struct.unpack(">qq", v)
            parts.append("deadline_ns=%d timestamp_ns=%d" % (dl, ts))
        elif k == KEY_TRACE and len(v) in (32, 40):
            span, parent, trace, flags = struct.unpack(">QQQQ", v[:32])
            parts.append("trace=%x/%x/%x/%d" % (trace, parent, span, flags))
            if len(v) == 40:
                parts.append("trace_high=%x" % struct.unpack(">Q", v[32:])[0])
    return " ".join(parts)


# --- The server. ------------------------------------------------------------------------------

class Connection:
    next_id = 1

    def __init__(self, server, reader, writer):
        self.server = server
        self.args = server.args
        self.reader = reader
        self.writer = writer
        self.id = Connection.next_id
        Connection.next_id += 1
        self.pending = {}  # tag -> asyncio.Task handling a dispatch
        self.partial = {}  # tag -> (type, bytearray) of fragments received
        self.queue = []  # list of lists of frames (round-robin writer)
        self.queue_event = asyncio.Event()
        self.first_frame = True
        self.probe_seen = False
        self.handshaken = False
        self.peer_framer = UNLIMITED
        self.draining = False
        self.drain_acked = False
        self.closed = False
        self.ping_outstanding = False
        self.tasks = set()
        self.dripping = False  # "drip:MS" owns the socket: the writer loop waits
        self.tls_rinit = None  # Rinit bytes to write just before the opportunistic TLS upgrade
        self.upgrading = False  # the TLS handshake owns the socket: the writer loop waits
        self.close_when_flushed = None  # reason to close once the queue is written

    def log(self, text):
        self.server.log.line("conn=%d %s" % (self.id, text))

    # ---- writing ----

    def out_framer(self):
        framer = self.peer_framer
        if self.args.framer:
            framer = min(framer, self.args.framer)
        return framer

    def send(self, mtype, tag, body=b"", note="", prefix=b""):
        """Queues a message; `prefix` (whole frames, logged by the caller) goes out in the same
        write as its first frame."""
        if self.closed:
            return
        frames = fragments(mtype, tag, body, self.out_framer())
        frames[0] = prefix + frames[0]
        self.log("send %s tag=%d size=%d%s%s" % (
            NAMES.get(mtype, "0x%02x" % mtype), tag, len(body),
            " fragments=%d" % len(frames) if len(frames) > 1 else "",
            (" " + note) if note else ""))
        self.queue.append(list(frames))
        self.queue_event.set()

    def unqueue(self, mtype, tag):
        """Removes a queued, not yet fully written message; returns True if found."""
        for i, frames in enumerate(self.queue):
            if frames and frames[-1][4] == mtype and \
                    int.from_bytes(frames[-1][5:8], "big") & TAG_MASK == tag:
                del self.queue[i]
                return True
        return False

    async def writer_loop(self):
        try:
            while not self.closed:
                await self.queue_event.wait()
                self.queue_event.clear()
                while self.queue and not self.closed and not self.dripping and \
                        not self.upgrading:
                    # One frame per queued message per round (Finagle's writer).
                    current, self.queue = self.queue, []
                    keep = []
                    for frames in current:
                        self.writer.write(frames.pop(0))
                        if frames:
                            keep.append(frames)
                    self.queue = keep + self.queue
                    await self.writer.drain()
                if self.close_when_flushed and not self.queue and not self.upgrading:
                    self.close(self.close_when_flushed)
                self.maybe_finish_drain()
        except (ConnectionError, asyncio.CancelledError):
            pass

    def close(self, why):
        if self.closed:
            return
        self.closed = True
        self.log("close %s" % why)
        for task in list(self.pending.values()):
            task.cancel()
        for task in list(self.tasks):
            task.cancel()
        try:
            self.writer.close()
        except Exception:
            pass

    def maybe_finish_drain(self):
        if self.drain_acked and not self.pending and not self.queue and not self.closed:
            self.close("drained")

    def greeting(self, what, note):
        """The frame of --greet / --greet-after-tinit, logged: Tping or Tdrain (tag 1; a Tdrain
        also makes the connection drain, as "drain" does), or b"" for none."""
        if what not in ("tping", "tdrain"):
            return b""
        mtype = TPING if what == "tping" else TDRAIN
        if mtype == TDRAIN:
            self.draining = True
        self.log("send %s tag=1 size=0 %s" % (NAMES[mtype], note))
        return frame(mtype, 1)

    # ---- reading ----

    async def run(self):
        self.log("open")
        greeting = self.greeting(self.args.greet, "greet")
        if greeting:
            self.queue.append([greeting])
        writer_task = asyncio.ensure_future(self.writer_loop())
        ping_task = None
        if self.args.mode == "strict":
            ping_task = asyncio.ensure_future(self.ping_loop())
        try:
            while not self.closed:
                header = await self.reader.readexactly(8)
                size, mtype = struct.unpack(">IB", header[:5])
                raw_tag = int.from_bytes(header[5:8], "big")
                if size < 4 or size > self.args.max_frame_size:
                    raise ProtocolFault("bad frame size %d" % size)
                body = await self.reader.readexactly(size - 4)
                self.on_frame(mtype, raw_tag & TAG_MASK, bool(raw_tag & FRAGMENT), body)
                if self.tls_rinit is not None:
                    await self.start_tls()
        except asyncio.IncompleteReadError as e:
            if e.partial:
                self.log("recv partial-frame %d bytes" % len(e.partial))
            self.close("eof")
        except ProtocolFault as e:
            self.log("protocol-error %s" % e)
            self.close("protocol-error")
        except (ConnectionError, asyncio.CancelledError):
            self.close("reset")
        except ssl.SSLError as e:
            self.log("tls-error %s" % e)
            self.close("tls-error")
        finally:
            self.close("done")
            writer_task.cancel()
            if ping_task:
                ping_task.cancel()

    def on_frame(self, mtype, tag, fragment, body):
        if mtype in (TDISPATCH, RDISPATCH):
            entry = self.partial.get(tag)
            if fragment:
                self.log("recv %s-fragment tag=%d size=%d" % (NAMES[mtype], tag, len(body)))
                if entry is None:
                    self.partial[tag] = (mtype, bytearray(body))
                else:
                    entry[1].extend(body)
                return
            if entry is not None:
                del self.partial[tag]
                entry[1].extend(body)
                self.log("recv %s-fragment tag=%d size=%d final" % (NAMES[mtype], tag, len(body)))
                body = bytes(entry[1])
        elif fragment:
            raise ProtocolFault("fragment bit on type 0x%02x" % mtype)
        first = self.first_frame
        self.first_frame = False
        self.on_message(mtype, tag, body, first)

    def on_message(self, mtype, tag, body, first):
        name = NAMES.get(mtype)
        if name is None:
            self.log("recv unknown type=0x%02x tag=%d size=%d" % (mtype, tag, len(body)))
            raise ProtocolFault("unknown mux message type %d" % signed_type(mtype))
        mode = self.args.mode

        if mtype in (RERR, RERR_LEGACY):
            self.log("recv Rerr tag=%d code=0x%02x size=%d why=%s" % (
                tag, mtype, len(body), body.decode("utf-8", "replace")))
            if tag == 1 and body == PROBE and not self.probe_seen and mode != "old":
                self.probe_seen = True
                self.send(RERR_LEGACY, 1, PROBE, "probe-echo")
            elif mode == "old":
                self.send(RERR_LEGACY, tag, b"Unexpected mux message type %d" %
                          signed_type(mtype))
            return

        if mtype == TINIT:
            version, headers = decode_init(body)
            self.log("recv Tinit tag=%d size=%d version=%d headers=%s" % (
                tag, len(body), version, ",".join(k.decode() for k, _ in headers)))
            if self.args.hang_up_on_tinit:
                self.writer.transport.abort()
                self.close("hang-up-on-tinit")
                return
            if mode == "old":
                self.send(RERR_LEGACY, tag, b"Unexpected mux message type %d" % TINIT)
                return
            if version != 1:
                self.send(RERR_LEGACY, tag, b"unsupported mux version %d" % version)
                self.close("bad-version")
                return
            for k, v in headers:
                if k == b"mux-framer" and len(v) == 4:
                    val = struct.unpack(">i", v)[0]
                    if val > 0:
                        self.peer_framer = val
            client_tls = dict(headers).get(b"tls", b"off").decode("utf-8", "replace")
            if client_tls not in TLS_LEVELS:
                client_tls = "off"  # unknown = off (mux-protocol.md 1.7)
            ours = self.args.tls_mode if self.args.tls_mode in TLS_LEVELS else "off"
            outcome = tls_outcome(ours, client_tls)
            if self.writer.get_extra_info("ssl_object") is not None:
                outcome = "plaintext" if outcome != "incompatible" else outcome
            framer = self.args.framer if self.args.framer else UNLIMITED
            rheaders = [(b"mux-framer", struct.pack(">i", framer)), (b"tls", ours.encode())]
            rbody = struct.pack(">H", 1)
            for k, v in rheaders:
                rbody += struct.pack(">I", len(k)) + k + struct.pack(">I", len(v)) + v
            note = "framer=%d tls=%s client-tls=%s outcome=%s" % (framer, ours, client_tls,
                                                                 outcome)
            # --greet-after-tinit: in the Rinit's write, so that the client reads both at once.
            greeting = self.greeting(self.args.greet_after_tinit, "greet-after-tinit")
            if outcome == "tls":
                # Written by start_tls() right before the handshake (the reader loop calls it
                # once this frame is handled), so no plaintext byte follows Rinit.
                self.log("send Rinit tag=%d size=%d %s" % (tag, len(rbody), note))
                self.tls_rinit = greeting + frame(RINIT, tag, rbody)
                return
            self.handshaken = True
            self.send(RINIT, tag, rbody, note, prefix=greeting)
            if outcome == "incompatible":
                self.close_when_flushed = "tls-incompatible"
            return

        if mtype == TPING:
            self.log("recv Tping tag=%d" % tag)
            if not self.args.no_ping_reply:
                self.send(RPING, tag)
            return
        if mtype == RPING:
            self.log("recv Rping tag=%d" % tag)
            self.ping_outstanding = False
            return
        if mtype == RDRAIN:
            self.log("recv Rdrain tag=%d" % tag)
            if self.draining:
                self.drain_acked = True
                self.maybe_finish_drain()
            return
        if mtype in (TDISCARDED, TDISCARDED_LEGACY):
            r = Reader("Tdiscarded", body)
            which = r.u(3, "which") & TAG_MASK
            why = r.rest().decode("utf-8", "replace")
            self.log("recv Tdiscarded tag=%d code=0x%02x which=%d why=%s" % (
                tag, mtype, which, why))
            self.partial.pop(which, None)
            task = self.pending.pop(which, None)
            if task is not None:
                task.cancel()
            # A reply still queued (or partly written) is replaced by Rdiscarded (Finagle).
            unqueued = self.unqueue(RDISPATCH, which) or self.unqueue(RERR_LEGACY, which)
            if task is not None or unqueued:
                self.send(RDISCARDED, which)
                self.maybe_finish_drain()
            return
        if mtype == TDISPATCH:
            self.on_dispatch(tag, body)
            return
        if mtype == TREQ:
            self.log("recv Treq tag=%d size=%d" % (tag, len(body)))
            self.send(RERR_LEGACY, tag, b"Treq is not supported by this server")
            return
        # Unexpected messages (R messages we did not ask for, Tlease/Tdrain from a client).
        self.log("recv %s tag=%d size=%d unexpected" % (name, tag, len(body)))
        self.send(RERR_LEGACY, tag, b"Unexpected mux message type %d" % signed_type(mtype))

    def on_dispatch(self, tag, body):
        contexts, dst, dtab, payload = decode_tdispatch(body)
        try:
            method, seqid, args = self.server.echo.decode_call(payload)
        except Exception as e:  # not a Thrift call
            method, seqid, args = None, 0, None
            self.log("thrift-decode-error %s" % e)
        arg = ""
        if args is not None:
            for field in ("message", "millis"):
                if getattr(args, field, None) is not None:
                    arg = str(getattr(args, field))
        self.log("recv Tdispatch tag=%d size=%d %s dst=%s dtab=%d method=%s arg=%s" % (
            tag, len(body), describe_contexts(contexts), dst.decode("utf-8", "replace"),
            len(dtab), method, arg))
        if tag in self.pending:
            # Finagle: a dispatch on an outstanding tag is a protocol fault.
            self.log("duplicate-tag %d" % tag)
            for t in list(self.pending):
                self.pending.pop(t).cancel()
                self.send(RERR_LEGACY, t, b"duplicate tag %d" % tag)
            self.queue_event.set()
            asyncio.get_event_loop().call_later(0.05, self.close, "duplicate-tag")
            return
        if tag < 2:
            self.send(RERR_LEGACY, tag, b"invalid dispatch tag %d" % tag)
            return
        failure = struct.pack(">Q", 3)  # Retryable | Rejected
        if self.args.mode == "strict" and not self.handshaken:
            self.send(RDISPATCH, tag, bytes([STATUS_NACK]) +
                      encode_contexts([(KEY_MUX_FAILURE, failure)]), "nack=no-handshake")
            return
        if self.draining:
            self.send(RDISPATCH, tag, bytes([STATUS_NACK]) +
                      encode_contexts([(KEY_MUX_FAILURE, failure)]), "nack=draining")
            return
        task = asyncio.ensure_future(self.handle(tag, contexts, method, seqid, args))
        self.pending[tag] = task

    async def start_tls(self):
        """Opportunistic TLS: writes whatever is queued and Rinit, then wraps the socket. The
        client sends nothing between Tinit and its ClientHello, and the transport stops reading
        as soon as the upgrade starts, so no TLS byte is read as Mux."""
        rinit, self.tls_rinit = self.tls_rinit, None
        self.upgrading = True
        current, self.queue = self.queue, []
        for frames in current:
            for f in frames:
                self.writer.write(f)
        self.writer.write(rinit)
        try:
            await self.writer.start_tls(self.server.ssl_context)
        finally:
            self.upgrading = False
        self.log("tls-upgraded %s" % tls_info(self.writer))
        self.handshaken = True
        self.queue_event.set()

    async def handle(self, tag, contexts, method, seqid, args):
        try:
            await self._handle(tag, contexts, method, seqid, args)
        except asyncio.CancelledError:
            pass
        finally:
            if self.pending.get(tag) is asyncio.current_task():
                del self.pending[tag]
            self.maybe_finish_drain()

    def reply_contexts(self, contexts):
        out = []
        for k, v in contexts:
            if k == KEY_REQ_HEADERS:
                try:
                    decode_headers(v)
                    out.append((KEY_RESP_HEADERS, v))
                except ProtocolFault:
                    pass
        return out

    def fail_contexts(self):
        """The contexts of a --fail-all / --fail-first error: MuxFailure = --fail-flags, if given."""
        if self.args.fail_flags is None:
            return encode_contexts([])
        return encode_contexts([(KEY_MUX_FAILURE, struct.pack(">Q", self.args.fail_flags))])

    def reply_ok(self, tag, contexts, payload, note=""):
        self.pending.pop(tag, None)
        self.send(RDISPATCH, tag, bytes([STATUS_OK]) +
                  encode_contexts(self.reply_contexts(contexts)) + payload, note)

    async def _handle(self, tag, contexts, method, seqid, args):
        echo = self.server.echo
        if self.args.delay > 0:  # --delay: this server is slow for every call
            await asyncio.sleep(self.args.delay / 1000.0)
        if method is None:
            self.pending.pop(tag, None)
            self.send(RDISPATCH, tag, bytes([STATUS_ERROR]) + encode_contexts([]) +
                      b"payload is not a Thrift call")
            return
        if self.args.fail_all:  # --fail-all: this server fails every call
            self.pending.pop(tag, None)
            self.send(RDISPATCH, tag, bytes([STATUS_ERROR]) + self.fail_contexts() +
                      b"this server fails every call (--fail-all)", "error")
            return
        if self.server.failures_left > 0:  # --fail-first N: this call is one of the first N
            self.server.failures_left -= 1
            self.pending.pop(tag, None)
            self.send(RDISPATCH, tag, bytes([STATUS_ERROR]) + self.fail_contexts() +
                      b"this server fails its first %d calls (--fail-first)" % self.args.fail_first,
                      "error fail-first")
            return
        if args is None:
            self.reply_ok(tag, contexts, echo.app_exception(method, seqid,
                                                            "unknown method " + method))
            return
        if method == "ping":
            self.reply_ok(tag, contexts, echo.reply(method, seqid))
        elif method == "fail":
            self.reply_ok(tag, contexts, echo.reply(method, seqid, error_message=args.message))
        elif method == "sleep":
            await asyncio.sleep(max(0, args.millis or 0) / 1000.0)
            self.reply_ok(tag, contexts, echo.reply(method, seqid, success=str(args.millis)))
        elif method == "echo":
            await self.echo(tag, contexts, seqid, args.message or "")

    async def echo(self, tag, contexts, seqid, message):
        echo = self.server.echo
        if message == "drain":
            self.reply_ok(tag, contexts, echo.reply("echo", seqid, success=message))
            self.draining = True
            self.send(TDRAIN, 1)
        elif message.startswith("drain-stalled:"):
            reply_ms, resume_ms = (int(x) for x in message.split(":")[1:3])
            self.writer.transport.pause_reading()
            self.log("stall tag=%d for %d ms" % (tag, resume_ms))
            await asyncio.sleep(reply_ms / 1000.0)
            self.reply_ok(tag, contexts, echo.reply("echo", seqid, success=message))
            self.draining = True
            self.send(TDRAIN, 1)
            await asyncio.sleep(max(0, resume_ms - reply_ms) / 1000.0)
            if not self.closed:
                self.log("resume reading")
                self.writer.transport.resume_reading()
        elif message.startswith("lease:"):
            ms = int(message.split(":", 1)[1])
            self.send(TLEASE, 0, bytes([0]) + struct.pack(">Q", ms), "lease_ms=%d" % ms)
            self.reply_ok(tag, contexts, echo.reply("echo", seqid, success=message))
        elif message == "nack":
            self.pending.pop(tag, None)
            self.send(RDISPATCH, tag, bytes([STATUS_NACK]) +
                      encode_contexts([(KEY_MUX_FAILURE, struct.pack(">Q", 3))]), "nack")
        elif message == "nack-final":
            self.pending.pop(tag, None)
            self.send(RDISPATCH, tag, bytes([STATUS_NACK]) +
                      encode_contexts([(KEY_MUX_FAILURE, struct.pack(">Q", 6))]), "nack-final")
        elif message.startswith("error:"):
            self.pending.pop(tag, None)
            self.send(RDISPATCH, tag, bytes([STATUS_ERROR]) + encode_contexts([]) +
                      message.split(":", 1)[1].encode(), "error")
        elif message.startswith("error-flags:"):
            flags, text = message.split(":", 2)[1:]
            self.pending.pop(tag, None)
            self.send(RDISPATCH, tag, bytes([STATUS_ERROR]) +
                      encode_contexts([(KEY_MUX_FAILURE, struct.pack(">Q", int(flags)))]) +
                      text.encode(), "error flags=%s" % flags)
        elif message.startswith("rerr:"):
            self.pending.pop(tag, None)
            self.send(RERR_LEGACY, tag, message.split(":", 1)[1].encode())
        elif message == "noreply":
            await asyncio.Event().wait()  # until Tdiscarded or close cancels us
        elif message == "hang-up":
            self.writer.transport.abort()
            self.close("hang-up")
        elif message == "garbage":
            self.pending.pop(tag, None)
            self.log("send garbage tag=%d" % tag)
            self.queue.append([frame(0x12, tag, b"garbage")])
            self.queue_event.set()
        elif message == "close-mid-frame":
            self.pending.pop(tag, None)
            body = bytes([STATUS_OK]) + encode_contexts([]) + \
                echo.reply("echo", seqid, success=message)
            data = frame(RDISPATCH, tag, body)
            self.log("send half-frame tag=%d bytes=%d of %d" % (tag, len(data) // 2, len(data)))
            await self.writer.drain()
            self.writer.write(data[:len(data) // 2])
            await self.writer.drain()
            self.close("mid-frame")
        elif message == "duplicate-reply":
            self.pending.pop(tag, None)
            data = frame(RDISPATCH, tag, bytes([STATUS_OK]) + encode_contexts([]) +
                         echo.reply("echo", seqid, success=message))
            self.log("send duplicate-reply tag=%d" % tag)
            await self.writer.drain()
            self.writer.write(data + data)
            await self.writer.drain()
        elif message == "stall":
            # Stop reading (the client's writes pile up in the socket buffers, then in its own
            # queue) and never reply, until "reset-stalled" on another connection.
            self.pending.pop(tag, None)
            self.writer.transport.pause_reading()
            self.server.stalled.append(self)
            self.log("stall tag=%d" % tag)
            await asyncio.Event().wait()
        elif message == "reset-stalled":
            stalled, self.server.stalled = self.server.stalled, []
            for conn in stalled:
                sock = conn.writer.get_extra_info("socket")
                if sock is not None and not conn.closed:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    conn.writer.transport.abort()
                    conn.close("reset (stalled)")
            self.reply_ok(tag, contexts, echo.reply("echo", seqid, success="reset %d" % len(stalled)))
        elif message == "tls-info":
            self.reply_ok(tag, contexts, echo.reply("echo", seqid, success=tls_info(self.writer)))
        elif message.startswith("ping-burst:"):
            n = int(message.split(":", 1)[1])
            self.pending.pop(tag, None)
            self.log("send ping-burst tag=1 count=%d" % n)
            self.writer.write(frame(TPING, 1) * n + frame(RDISPATCH, tag, bytes([STATUS_OK]) + encode_contexts([]) +
                                                         echo.reply("echo", seqid, success=message)))
        elif message.startswith("drain-ping-burst:"):
            n = int(message.split(":", 1)[1])
            self.pending.pop(tag, None)
            self.log("send drain-ping-burst tag=1 count=%d" % n)
            self.writer.write(frame(TDRAIN, 1) + frame(TPING, 1) * n +
                              frame(RDISPATCH, tag, bytes([STATUS_OK]) + encode_contexts([]) +
                                    echo.reply("echo", seqid, success=message)))
        elif message in ("huge-frame", "endless-fragments", "stray-fragments", "ping-flood") or \
                message.startswith("drip:"):
            self.pending.pop(tag, None)  # Tdiscarded must not cut these short
            await self.hostile(tag, contexts, seqid, message)
        elif message == "contexts":
            keys = ",".join(k.decode("utf-8", "replace") for k, _ in contexts)
            self.reply_ok(tag, contexts, echo.reply("echo", seqid, success=keys))
        elif message == "trace":
            value = dict(contexts).get(b"com.twitter.finagle.tracing.TraceContext")
            if value is None or len(value) not in (32, 40):
                text = "no trace"
            else:  # spanId:8 parentId:8 traceId:8 flags:8 (mux-protocol.md 1.6)
                span, parent, trace, flags = struct.unpack(">QQQQ", value[:32])
                text = "trace=%016x span=%016x parent=%016x flags=%d" % (trace, span, parent, flags)
                if len(value) == 40:  # + traceIdHigh:8
                    text += " high=%016x" % struct.unpack(">Q", value[32:])[0]
            self.reply_ok(tag, contexts, echo.reply("echo", seqid, success=text))
        else:
            self.reply_ok(tag, contexts, echo.reply("echo", seqid, success=message))

    async def hostile(self, tag, contexts, seqid, message):
        """The hostile-peer misbehaviours (see the module docstring). Frames are written whole
        (asyncio buffers each write), so they never interleave with the writer loop's."""
        try:
            if message == "huge-frame":
                self.log("send huge-frame tag=%d size=2147483648" % tag)
                header = struct.pack(">IB", 0x80000000, RDISPATCH) + tag.to_bytes(3, "big")
                self.writer.write(header + bytes([STATUS_OK]) + b"\x00" * 4095)
                await self.writer.drain()
            elif message == "endless-fragments":
                self.log("send endless-fragments tag=%d" % tag)
                first = bytes([STATUS_OK]) + encode_contexts([])
                piece = b"f" * 16384
                sent = 0
                try:
                    while not self.closed and sent < (1 << 30):
                        body = first + piece[len(first):] if sent == 0 else piece
                        self.writer.write(frame(RDISPATCH, tag, body, fragment=True))
                        sent += len(body)
                        await self.writer.drain()
                finally:
                    self.log("endless-fragments tag=%d stopped after %d bytes" % (tag, sent))
            elif message == "ping-flood":
                # Stop reading (the client's Rping replies pile up in its send path) and
                # write Tping until the client gives up on the connection.
                self.writer.transport.pause_reading()
                self.log("send ping-flood tag=1")
                chunk = frame(TPING, 1) * 8192
                sent = 0
                try:
                    while not self.closed and sent < (256 << 20):
                        self.writer.write(chunk)
                        sent += len(chunk)
                        await self.writer.drain()
                finally:
                    self.log("ping-flood stopped after %d Tping" % (sent // 8))
            elif message == "stray-fragments":
                self.log("send stray-fragments tags=1000..1095 bytes=%d" % (96 * 15 * 65536))
                piece = b"s" * 65536
                for stray in range(1000, 1096):
                    for _ in range(15):
                        if self.closed:
                            return
                        self.writer.write(frame(RDISPATCH, stray, piece, fragment=True))
                    await self.writer.drain()
                self.reply_ok(tag, contexts, self.server.echo.reply("echo", seqid, success=message))
            else:
                ms = int(message.split(":", 1)[1])
                data = frame(RDISPATCH, tag, bytes([STATUS_OK]) + encode_contexts([]) +
                             self.server.echo.reply("echo", seqid, success=message))
                self.log("send drip tag=%d bytes=%d every=%dms" % (tag, len(data), ms))
                self.dripping = True
                await self.writer.drain()
                for i in range(len(data)):
                    if self.closed:
                        break
                    self.writer.write(data[i:i + 1])
                    await self.writer.drain()
                    await asyncio.sleep(ms / 1000.0)
                self.dripping = False
                self.queue_event.set()
                self.log("drip tag=%d done" % tag)
        except ConnectionError:
            self.close("reset")

    async def ping_loop(self):
        try:
            while not self.closed:
                await asyncio.sleep(self.args.ping_interval / 1000.0)
                if self.handshaken and not self.ping_outstanding and not self.closed:
                    self.ping_outstanding = True
                    self.send(TPING, 1)
        except asyncio.CancelledError:
            pass


class Server:
    def __init__(self, args, echo):
        self.args = args
        self.echo = echo
        self.log = Log(args.log)
        self.stalled = []  # connections that stopped reading on "stall"
        self.failures_left = args.fail_first  # --fail-first: errors still to answer
        self.connections = set()
        self.ssl_context = make_ssl_context(args)

    async def on_client(self, reader, writer):
        conn = Connection(self, reader, writer)
        self.connections.add(conn)
        try:
            await conn.run()
        finally:
            self.connections.discard(conn)

    async def main(self):
        first_byte = self.args.tls_mode == "first-byte"
        loop = asyncio.get_event_loop()
        # Failed TLS handshakes (the tests' wrong-CA clients) go to the log, not to stderr.
        loop.set_exception_handler(
            lambda _, context: self.log.line("loop-error %s %s" % (
                context.get("message"), context.get("exception", ""))))
        server = await asyncio.start_server(self.on_client, self.args.host, self.args.port,
                                            reuse_address=True,
                                            ssl=self.ssl_context if first_byte else None)
        port = server.sockets[0].getsockname()[1]
        self.log.line("server mode=%s port=%d framer=%s tls=%s" % (
            self.args.mode, port, self.args.framer, self.args.tls_mode or "none"))
        # The handlers before the port is printed: a fixture that stops the server as soon as
        # it has the port must not kill it before its temporary directory is cleaned up.
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        print("listening %s:%d" % (self.args.host, port), flush=True)
        await stop.wait()
        server.close()
        for conn in list(self.connections):
            conn.close("shutdown")
        self.log.line("server stopped")


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    default_idl = os.path.normpath(os.path.join(here, "..", "..", "..", "tools", "echo.thrift"))
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--mode", choices=["finagle", "strict", "old"], default="finagle")
    p.add_argument("--framer", type=int, default=0,
                   help="max fragment body: advertised in Rinit and used to split replies "
                        "(0 = unlimited)")
    p.add_argument("--ping-interval", type=int, default=1000, help="ms (strict mode)")
    p.add_argument("--max-frame-size", type=int, default=UNLIMITED)
    p.add_argument("--no-ping-reply", action="store_true",
                   help="never answer Tping (a dead peer for the client's failure detector)")
    p.add_argument("--delay", type=int, default=0,
                   help="ms to wait before handling each dispatch (a slow server; Tdiscarded "
                        "cancels the wait)")
    p.add_argument("--greet", choices=["tping", "tdrain"], default="",
                   help="write this control message (tag 1) as soon as a connection opens")
    p.add_argument("--greet-after-tinit", choices=["tping", "tdrain"], default="",
                   help="write this control message (tag 1) on receiving Tinit, before Rinit")
    p.add_argument("--hang-up-on-tinit", action="store_true",
                   help="end the connection abruptly (no TLS close_notify) on receiving Tinit")
    p.add_argument("--fail-all", action="store_true",
                   help="answer every call with an Rdispatch error")
    p.add_argument("--fail-first", type=int, default=0,
                   help="answer the first N calls (over all connections) with an Rdispatch error")
    p.add_argument("--fail-flags", type=int, default=None,
                   help="MuxFailure flags of the --fail-all / --fail-first errors (1 Retryable, "
                        "2 Rejected, 4 NonRetryable; default: no MuxFailure context)")
    p.add_argument("--tls-cert", default="", help="PEM certificate chain of the server")
    p.add_argument("--tls-key", default="", help="PEM private key of the server")
    p.add_argument("--tls-client-ca", default="",
                   help="require client certificates signed by this PEM CA (mutual TLS)")
    p.add_argument("--tls-mode", choices=["first-byte"] + list(TLS_LEVELS), default="",
                   help="first-byte: TLS from the first byte; off/desired/required: the "
                        "opportunistic TLS level answered in Rinit (default: plaintext, tls=off)")
    p.add_argument("--log", default="")
    p.add_argument("--work-dir", default="",
                   help="where to generate the Echo code (default: a temporary directory, "
                        "removed at exit unless the server is killed)")
    p.add_argument("--thrift", default="/usr/bin/thrift", help="thrift compiler")
    p.add_argument("--idl", default=default_idl)
    args = p.parse_args()
    if args.tls_mode in ("first-byte", "desired", "required") and not (args.tls_cert and
                                                                       args.tls_key):
        p.error("--tls-mode %s needs --tls-cert and --tls-key" % args.tls_mode)
    def serve(work_dir):
        echo_module, ttypes = load_echo_module(args.thrift, args.idl, work_dir)
        server = Server(args, EchoCodec(echo_module, ttypes))
        asyncio.run(server.main())

    if args.work_dir:
        os.makedirs(args.work_dir, exist_ok=True)
        serve(args.work_dir)
    else:
        with tempfile.TemporaryDirectory(prefix="mux-server-") as tmp:
            serve(tmp)


if __name__ == "__main__":
    main()
