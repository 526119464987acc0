// bench_raw_floor: the cheapest client possible, as the floor the benchmark compares scales' CPU
// per call against. No framework: one blocking socket, request bytes built once by hand, replies
// parsed only as far as their frame header.
//
//   bench_raw_floor --port P --protocol mux|thrift [--outstanding N] [--duration-ms 3000]
//                   [--payload-size 16] [--busy-poll-us 0]
//
// mux:    Tdispatch frames (no contexts, empty dst and dtab) carrying the strict binary Thrift
//         call echo(payload), N tags outstanding on one connection. Each read() takes whatever
//         replies have arrived; a new Tdispatch is queued for every reply's tag, and all of them
//         go out in one write(): the batching a multiplexing client can do at best.
// thrift: framed binary Thrift echo(payload) on one connection. With --outstanding N > 1 the
//         calls are pipelined: N requests are written before the first reply is read, and each
//         reply (they come in order: a Thrift server answers a connection's requests one after
//         another) is answered by a new request, the requests of one read() in one write().
//         No client in the comparisons pipelines; this measures what the server allows at best.
// --busy-poll-us N: before each blocking read, try non-blocking reads for up to N us (the peer
//         of scales' RuntimeOptions::busy_poll); 0 (default) = block at once.
//
// Prints one JSON line (bench_util.h). A reply that is not a successful Rdispatch carrying a
// Thrift REPLY for a tag in flight (mux) or a REPLY (thrift) ends the program with an error: a
// floor that skips work, or counts an application error or a duplicate as a call, would be no
// floor. So does a server that stops answering: the socket's reads and writes time out after
// 10 s (SO_RCVTIMEO, SO_SNDTIMEO; connect too).
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "bench_util.h"

namespace {

using Clock = std::chrono::steady_clock;
using scales::bench::Flags;

constexpr int kIoTimeoutS = 10;

void PutBe32(std::string& out, uint32_t v) {
  const char b[4] = {static_cast<char>(v >> 24), static_cast<char>(v >> 16),
                     static_cast<char>(v >> 8), static_cast<char>(v)};
  out.append(b, 4);
}

uint32_t GetBe16(const char* p) {
  return static_cast<uint32_t>(static_cast<uint8_t>(p[0])) << 8 | static_cast<uint8_t>(p[1]);
}

uint32_t GetBe32(const char* p) {
  auto u = [p](int i) { return static_cast<uint32_t>(static_cast<uint8_t>(p[i])); };
  return u(0) << 24 | u(1) << 16 | u(2) << 8 | u(3);
}

// Strict binary Thrift CALL echo(1: string message), sequence id 0.
std::string EchoCall(const std::string& message) {
  std::string out;
  PutBe32(out, 0x80010001u);  // version 1, CALL
  PutBe32(out, 4);
  out += "echo";
  PutBe32(out, 0);  // seqid
  out += '\x0b';    // field 1: string
  out += '\x00';
  out += '\x01';
  PutBe32(out, static_cast<uint32_t>(message.size()));
  out += message;
  out += '\x00';  // stop
  return out;
}

// A Tdispatch frame for `tag` (the tag goes in bytes 5..7).
std::string Tdispatch(const std::string& thrift_call) {
  std::string body;
  body += '\x02';          // type Tdispatch
  body.append(3, '\0');    // tag, patched per request
  body.append("\0\0", 2);  // no contexts
  body.append("\0\0", 2);  // empty dst
  body.append("\0\0", 2);  // no dtab entries
  body += thrift_call;
  std::string frame;
  PutBe32(frame, static_cast<uint32_t>(body.size()));
  return frame + body;
}

void SetTag(std::string& out, size_t frame_start, uint32_t tag) {
  out[frame_start + 5] = static_cast<char>(tag >> 16);
  out[frame_start + 6] = static_cast<char>(tag >> 8);
  out[frame_start + 7] = static_cast<char>(tag);
}

void WriteAll(int fd, const std::string& bytes) {
  size_t off = 0;
  while (off < bytes.size()) {
    ssize_t n = ::write(fd, bytes.data() + off, bytes.size() - off);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      Flags::Die("bench_raw_floor: write: the server took no bytes for %d s (SO_SNDTIMEO)",
                 kIoTimeoutS);
    }
    if (n <= 0) Flags::Die("bench_raw_floor: write: %s", std::strerror(errno));
    off += static_cast<size_t>(n);
  }
}

int Connect(int port) {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) Flags::Die("bench_raw_floor: socket: %s", std::strerror(errno));
  // Bounds connect, every blocking read and every write: a hung server ends the run with an
  // error rather than blocking bench/run.
  const timeval limit{kIoTimeoutS, 0};
  if (::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &limit, sizeof limit) != 0 ||
      ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &limit, sizeof limit) != 0) {
    Flags::Die("bench_raw_floor: setsockopt(SO_RCVTIMEO/SO_SNDTIMEO): %s", std::strerror(errno));
  }
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    Flags::Die("bench_raw_floor: connect 127.0.0.1:%d: %s", port, std::strerror(errno));
  }
  int one = 1;
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  return fd;
}

}  // namespace

int main(int argc, char** argv) {
  Flags flags(argc, argv);
  const int port = static_cast<int>(flags.GetInt("port", 0, 65535));
  const std::string protocol = flags.Get("protocol", "mux");
  const uint32_t outstanding = static_cast<uint32_t>(flags.GetInt("outstanding", 1, UINT32_MAX));
  const auto duration = std::chrono::milliseconds(flags.GetInt("duration-ms", 3000));
  const std::string payload(static_cast<size_t>(flags.GetInt("payload-size", 16)), 'x');
  const auto busy_poll = std::chrono::microseconds(flags.GetInt("busy-poll-us", 0));
  flags.RejectUnknown();
  const bool mux = protocol == "mux";
  if (port <= 0 || busy_poll.count() < 0 || outstanding < 1 || outstanding > 0x7fffff ||
      (!mux && protocol != "thrift")) {
    Flags::Die(
        "usage: bench_raw_floor --port P --protocol mux|thrift [--outstanding N] "
        "[--duration-ms MS] [--busy-poll-us N]");
  }
  const int fd = Connect(port);
  const std::string call = EchoCall(payload);
  std::string request;
  if (mux) {
    request = Tdispatch(call);
  } else {
    PutBe32(request, static_cast<uint32_t>(call.size()));
    request += call;
  }

  // mux: send times by tag (1..N). thrift: a ring of the send times of the calls in flight, in
  // order (replies come in order), indexed by the count of calls sent / answered modulo N.
  std::vector<Clock::time_point> sent(outstanding + 1);
  std::vector<bool> in_flight_tag(outstanding + 1);  // mux: a reply's tag must be awaited
  uint64_t thrift_sent = 0, thrift_answered = 0;
  std::vector<int64_t> latency_us;
  latency_us.reserve(1 << 21);
  std::string out, in;
  in.resize(256 * 1024);
  size_t have = 0;

  const double cpu_begin = scales::bench::ProcessCpuSeconds();
  const auto begin = Clock::now();
  const auto end = begin + duration;
  for (uint32_t tag = 1; tag <= outstanding; ++tag) {
    out += request;
    if (mux) SetTag(out, out.size() - request.size(), tag);
    in_flight_tag[tag] = mux;
    sent[mux ? tag : thrift_sent++ % outstanding] = begin;
  }
  uint32_t in_flight = outstanding;
  bool stopping = false;
  while (in_flight > 0) {
    if (!out.empty()) {
      WriteAll(fd, out);
      out.clear();
    }
    ssize_t n = -1;
    if (busy_poll.count() > 0) {
      const auto give_up = Clock::now() + busy_poll;
      do {
        n = ::recv(fd, in.data() + have, in.size() - have, MSG_DONTWAIT);
      } while (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) &&
               Clock::now() < give_up);
    }
    if (n < 0) n = ::read(fd, in.data() + have, in.size() - have);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      Flags::Die(
          "bench_raw_floor: read: no reply from 127.0.0.1:%d for %d s (SO_RCVTIMEO); %u in flight",
          port, kIoTimeoutS, in_flight);
    }
    if (n <= 0)
      Flags::Die("bench_raw_floor: read: %s", n == 0 ? "connection closed" : std::strerror(errno));
    have += static_cast<size_t>(n);
    const auto now = Clock::now();
    stopping = stopping || now >= end;
    size_t pos = 0;
    while (have - pos >= 4) {
      const uint32_t size = GetBe32(in.data() + pos);
      if (size + size_t{4} > in.size())
        Flags::Die("bench_raw_floor: reply of %u bytes is too large", size);
      if (have - pos < size + size_t{4}) break;
      const char* f = in.data() + pos + 4;
      uint32_t tag = 1;
      bool ok;
      if (mux) {
        // type -2 (Rdispatch), a tag in flight, status 0 (Ok), and after its contexts a Thrift
        // REPLY: an Ok Rdispatch may carry an EXCEPTION (an application error).
        tag = size >= 4 ? static_cast<uint32_t>(static_cast<uint8_t>(f[1])) << 16 |
                              static_cast<uint8_t>(f[2]) << 8 | static_cast<uint8_t>(f[3])
                        : 0;
        ok = size >= 7 && static_cast<uint8_t>(f[0]) == 0xfe && f[4] == 0 && tag >= 1 &&
             tag <= outstanding && in_flight_tag[tag];
        size_t body = 7;
        for (uint32_t contexts = ok ? GetBe16(f + 5) : 0; ok && contexts > 0; --contexts) {
          for (int part = 0; ok && part < 2; ++part) {  // key, value
            ok = body + 2 <= size && body + 2 + GetBe16(f + body) <= size;
            if (ok) body += 2 + GetBe16(f + body);
          }
        }
        ok = ok && body + 4 <= size && GetBe32(f + body) == 0x80010002u;  // version 1, REPLY
        if (ok) in_flight_tag[tag] = false;
      } else {
        ok = size >= 4 && GetBe32(f) == 0x80010002u;  // version 1, REPLY
      }
      if (!ok) {
        Flags::Die(
            "bench_raw_floor: unexpected reply frame from 127.0.0.1:%d (%u bytes%s): "
            "expected %s",
            port, size,
            mux && tag >= 1 && tag <= outstanding && !in_flight_tag[tag]
                ? ", for a tag not in flight"
                : "",
            mux ? "an Ok Rdispatch carrying a Thrift REPLY, for a tag in flight"
                : "a Thrift REPLY");
      }
      const size_t slot = mux ? tag : thrift_answered++ % outstanding;
      latency_us.push_back(
          std::chrono::duration_cast<std::chrono::microseconds>(now - sent[slot]).count());
      --in_flight;
      if (!stopping) {
        out += request;
        if (mux) SetTag(out, out.size() - request.size(), tag);
        in_flight_tag[tag] = mux;
        sent[mux ? tag : thrift_sent++ % outstanding] = now;
        ++in_flight;
      }
      pos += 4 + size;
    }
    std::memmove(in.data(), in.data() + pos, have - pos);
    have -= pos;
  }
  const double elapsed = std::chrono::duration<double>(Clock::now() - begin).count();
  const double cpu = scales::bench::ProcessCpuSeconds() - cpu_begin;
  ::close(fd);
  scales::bench::PrintJson(static_cast<int64_t>(latency_us.size()), 0, elapsed, latency_us, cpu);
  return 0;
}
