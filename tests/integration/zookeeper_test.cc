// ZooKeeper server sets against the real ZooKeeper server (Debian's package, Java), with
// members written by python3-kazoo in Finagle's format and by our Announcer.
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>
#include <zookeeper/zookeeper.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <csignal>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <future>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/thread_pool.hpp>
#include <fmt/format.h>
#include <gtest/gtest.h>

#include "discovery/zk_connection.h"
#include "scales/core/client.h"
#include "scales/core/error.h"
#include "scales/core/log.h"
#include "scales/core/sink_stack.h"
#include "scales/discovery/zookeeper.h"
#include "scales/http/client.h"
#include "scales/stats/stats.h"
#include "support/fault_proxy.h"
#include "support/fixtures.h"
#include "support/handler_queue.h"
#include "support/log_capture.h"
#include "support/prometheus_text.h"
#include "support/zk_frame_relay.h"
#include "support/zookeeper_fixture.h"

namespace scales {
namespace {

using namespace std::chrono_literals;
using test::FinagleMemberPython;
using test::RunKazoo;
using test::TestHttpServer;
using test::WaitFor;
using test::ZooKeeperEnsemble;
using test::ZooKeeperServer;
using Members = ServerSet::Members;

#define SKIP_WITHOUT_ZOOKEEPER()                                       \
  if (!test::ZooKeeperAvailable()) GTEST_SKIP() << "ZooKeeper (java) not installed"

Members Eps(std::initializer_list<std::pair<const char*, int>> list) {
  Members out;
  for (auto& [h, p] : list) out.push_back({h, static_cast<uint16_t>(p)});
  return out;
}

std::string Show(const std::optional<Members>& m) {
  if (!m) return "(unknown)";
  std::string s = "[";
  for (auto& e : *m) s += e.ToString() + " ";
  return s + "]";
}

// Records the snapshots a subscriber receives (on a thread pool of its own).
class Recorder {
 public:
  explicit Recorder(ServerSet& set) : set_(set) {
    id_ = set_.Subscribe(pool_.get_executor(), [this](const Members& m) {
      std::lock_guard lock(mu_);
      snapshots_.push_back(m);
    });
  }
  ~Recorder() {
    set_.Unsubscribe(id_);
    pool_.join();
  }
  std::optional<Members> last() const {
    std::lock_guard lock(mu_);
    if (snapshots_.empty()) return std::nullopt;
    return snapshots_.back();
  }
  size_t count() const {
    std::lock_guard lock(mu_);
    return snapshots_.size();
  }
  std::vector<Members> all() const {
    std::lock_guard lock(mu_);
    return snapshots_;
  }
  bool WaitFor(const Members& want, std::chrono::milliseconds timeout = 20s) const {
    return test::WaitFor([&] { return last() == want; }, timeout);
  }

 private:
  ServerSet& set_;
  boost::asio::thread_pool pool_{1};
  mutable std::mutex mu_;
  std::vector<Members> snapshots_;
  uint64_t id_ = 0;
};

std::shared_ptr<ZooKeeperServerSet> MakeSet(const std::string& uri) {
  return std::make_shared<ZooKeeperServerSet>(ScalesUriParser::Parse(uri));
}

std::string CreateMember(const std::string& path, const std::string& host, int port,
                         const std::map<std::string, int>& additional = {},
                         const std::string& status = "ALIVE") {
  return fmt::format("print(zk.create('{}/member_', {}, sequence=True, makepath=True))", path,
                     FinagleMemberPython(host, port, additional, status));
}

// Expires a session the way ZooKeeper's own tests do: a second handle with the same id and
// password connects and closes, which ends the session for the first handle.
void ExpireSession(const std::string& hosts, const std::pair<int64_t, std::string>& session) {
  clientid_t id{};
  id.client_id = session.first;
  std::memcpy(id.passwd, session.second.data(), std::min(session.second.size(), sizeof id.passwd));
  zhandle_t* zh = zookeeper_init2(hosts.c_str(), nullptr, 10000, &id, nullptr, 0,
                                  [](const char*) {});
  ASSERT_NE(zh, nullptr);
  ASSERT_TRUE(WaitFor([&] { return zoo_state(zh) == ZOO_CONNECTED_STATE; }, 10s));
  zookeeper_close(zh);
}

// ExpireSession until `expired()` holds (up to 3 tries of 10 s). The trick races with the first
// handle: when the second one takes the session over, the server drops the first one's
// connection, and if the first handle reconnects (taking the session back) before the second
// one's close reaches the server, that close ends nothing. Slow runs (ThreadSanitizer) lose the
// race now and then.
template <class Expired>
bool ExpireSessionUntil(const std::string& hosts, const std::pair<int64_t, std::string>& session,
                        Expired expired) {
  for (int attempt = 0; attempt < 3; ++attempt) {
    ExpireSession(hosts, session);
    if (WaitFor(expired, 10s)) return true;
  }
  return false;
}

// A relay between ZooKeeper clients and a server that, once, drops the connection instead of
// passing on the reply to a create whose path contains `needle`: the server has made the node,
// and the client sees a connection loss while its session lives on. Records the requests on the
// cut create's parent path after the cut. With `refuse_after_cut`, the relay then refuses
// connections until SetRefusing(false).
class CreateReplyCutter {
 public:
  CreateReplyCutter(int server_port, std::string needle, bool refuse_after_cut = false)
      : needle_(std::move(needle)), refuse_after_cut_(refuse_after_cut),
        relay_(server_port, [this](std::string& frame, bool request) { return Inspect(frame, request); }) {}
  int port() const { return relay_.port(); }
  void SetRefusing(bool refusing) { relay_.SetRefusing(refusing); }
  uint64_t refused() const { return relay_.refused(); }
  bool cut() const { return cut_; }
  // The types of the requests on `parent` sent after the cut (9 sync, 12 getChildren2, ...).
  std::vector<int32_t> RequestsAfterCut(const std::string& parent) {
    std::lock_guard lock(mu_);
    std::vector<int32_t> types;
    for (const auto& [type, path] : after_cut_) {
      if (path == parent) types.push_back(type);
    }
    return types;
  }

 private:
  using Relay = test::ZkFrameRelay;
  // Relay thread.
  Relay::Verdict Inspect(const std::string& frame, bool request) {
    if (request && cut_) {
      std::lock_guard lock(mu_);
      after_cut_.emplace_back(Relay::Type(frame), std::string(Relay::Path(frame)));
    }
    if (request) {
      const int32_t type = Relay::Type(frame);  // 1 create, 15 create2
      if (!cut_ && cut_xid_ == 0 && (type == 1 || type == 15) &&
          Relay::Path(frame).find(needle_) != std::string_view::npos) {
        cut_xid_ = Relay::Xid(frame);
      }
      return Relay::Verdict::kPass;
    }
    if (cut_xid_ != 0 && Relay::Xid(frame) == cut_xid_ && !cut_) {
      cut_ = true;
      if (refuse_after_cut_) relay_.SetRefusing(true);
      return Relay::Verdict::kCut;
    }
    return Relay::Verdict::kPass;
  }

  const std::string needle_;
  const bool refuse_after_cut_;
  int32_t cut_xid_ = 0;
  std::atomic<bool> cut_{false};
  std::mutex mu_;
  std::vector<std::pair<int32_t, std::string>> after_cut_;  // type, path
  Relay relay_;  // last: stopped before the fields its inspector uses go
};

// A relay between ZooKeeper clients and a server that, once armed, answers the next `times`
// reads (getData) of a node whose path contains `needle` with the error `error` instead of the
// server's reply, as a server under load answers ZTHROTTLEDOP ("not executed, please retry").
class ReadErrorInjector {
 public:
  explicit ReadErrorInjector(int server_port)
      : relay_(server_port, [this](std::string& frame, bool request) { return Inspect(frame, request); }) {}
  int port() const { return relay_.port(); }
  void Arm(std::string needle, int32_t error, int times = 1) {
    std::lock_guard lock(mu_);
    needle_ = std::move(needle);
    error_ = error;
    left_ = times;
  }
  // Replies replaced so far.
  int injected() const { return injected_; }

 private:
  using Relay = test::ZkFrameRelay;
  Relay::Verdict Inspect(std::string& frame, bool request) {
    std::lock_guard lock(mu_);
    if (request) {
      if (left_ > 0 && Relay::Type(frame) == 4 && Relay::Path(frame).find(needle_) != std::string_view::npos) {
        --left_;
        xids_.insert(Relay::Xid(frame));
      }
    } else if (xids_.erase(Relay::Xid(frame)) != 0) {
      Relay::MakeError(frame, error_);
      ++injected_;
    }
    return Relay::Verdict::kPass;
  }

  std::mutex mu_;
  std::string needle_;
  int32_t error_ = 0;
  int left_ = 0;
  std::set<int32_t> xids_;  // reads whose reply is replaced
  std::atomic<int> injected_{0};
  Relay relay_;  // last: stopped before the fields its inspector uses go
};

class ZooKeeperTest : public ::testing::Test {
 protected:
  void SetUp() override {
    SKIP_WITHOUT_ZOOKEEPER();
    zk_ = std::make_unique<ZooKeeperServer>();
  }
  std::string Kazoo(const std::string& body) { return RunKazoo(zk_->connect_string(), body); }
  // Every child of `path`, with the session owning it: "/path/member_0000000001 <id>\n" each.
  std::string ChildrenAndOwners(const std::string& path) {
    return Kazoo(fmt::format("for n in sorted(zk.get_children('{0}')):\n"
                             "    print('{0}/' + n, zk.exists('{0}/' + n).ephemeralOwner)",
                             path));
  }
  std::unique_ptr<ZooKeeperServer> zk_;
};

TEST_F(ZooKeeperTest, KazooMembersInFinagleFormat) {
  Kazoo(CreateMember("/svc/a", "127.0.0.1", 1001, {{"http", 2001}}) + "\n" +
        CreateMember("/svc/a", "127.0.0.2", 1002) + "\n" +
        CreateMember("/svc/a", "127.0.0.3", 1003, {{"http", 2003}}, "STOPPING") + "\n" +
        CreateMember("/svc/a", "127.0.0.4", 1004, {}, "STARTING") + "\n" +
        "zk.create('/svc/a/not_a_member', " + FinagleMemberPython("127.0.0.9", 9) + ")\n" +
        "zk.create('/svc/a/member_bad', b'{not json')\n" +
        "zk.create('/svc/a/member_noport', b'{\"serviceEndpoint\":{\"host\":\"x\"},"
        "\"additionalEndpoints\":{},\"status\":\"ALIVE\"}')");
  auto set = MakeSet(zk_->Uri("/svc/a"));
  Recorder rec(*set);
  ASSERT_TRUE(rec.WaitFor(Eps({{"127.0.0.1", 1001}, {"127.0.0.2", 1002}}))) << Show(rec.last());
  EXPECT_EQ(set->stats().malformed_members, 2u);
  EXPECT_NE(set->last_error().find("malformed member /svc/a/member_"), std::string::npos)
      << set->last_error();
  EXPECT_NE(set->Describe().find("connected, 2 members"), std::string::npos) << set->Describe();

  // Named endpoint: members without "http" are skipped, not fatal.
  auto named = MakeSet(zk_->Uri("/svc/a#http"));
  Recorder named_rec(*named);
  ASSERT_TRUE(named_rec.WaitFor(Eps({{"127.0.0.1", 2001}}))) << Show(named_rec.last());

  // Malformed members do not stop later changes from being applied; a fixed member joins.
  Kazoo(CreateMember("/svc/a", "127.0.0.5", 1005) + "\n" +
        "zk.set('/svc/a/member_bad', " + FinagleMemberPython("127.0.0.6", 1006) + ")");
  ASSERT_TRUE(rec.WaitFor(Eps({{"127.0.0.1", 1001}, {"127.0.0.2", 1002}, {"127.0.0.5", 1005},
                               {"127.0.0.6", 1006}})))
      << Show(rec.last());
}

// A member whose one additional endpoint is bad (a port out of range) keeps serving its
// serviceEndpoint and its other endpoints, as with Finagle's parser; it used to be malformed as a
// whole. Only a set naming the bad endpoint goes without it, and last_error() says what was
// dropped.
TEST_F(ZooKeeperTest, ABadAdditionalEndpointDropsOnlyItself) {
  Kazoo("zk.create('/svc/partial/member_0', b'{\"serviceEndpoint\":{\"host\":\"127.0.0.1\",\"port\":1001},"
        "\"additionalEndpoints\":{\"http\":{\"host\":\"127.0.0.1\",\"port\":70000},"
        "\"admin\":{\"host\":\"127.0.0.1\",\"port\":3001}},\"status\":\"ALIVE\"}', makepath=True)");
  auto set = MakeSet(zk_->Uri("/svc/partial"));
  ASSERT_TRUE(WaitFor([&] { return set->members() == Members{{"127.0.0.1", 1001}}; })) << set->Describe();
  EXPECT_EQ(set->stats().malformed_members, 0u);
  EXPECT_NE(set->last_error().find("member /svc/partial/member_0: bad additional endpoints skipped (the member is "
                                   "used without them): additionalEndpoints.http.port: 70000 is out of range"),
            std::string::npos)
      << set->last_error();
  auto admin = MakeSet(zk_->Uri("/svc/partial#admin"));
  ASSERT_TRUE(WaitFor([&] { return admin->members() == Members{{"127.0.0.1", 3001}}; })) << admin->Describe();
  auto http = MakeSet(zk_->Uri("/svc/partial#http"));
  ASSERT_TRUE(WaitFor([&] { return http->Describe().find("1 without endpoint 'http'") != std::string::npos; }))
      << http->Describe();
  EXPECT_EQ(http->members(), Members{});
}

// A client whose build fails (a provider refuses its options) leaves nothing of its ZooKeeper
// statistics in the registry: its collector kept exporting them for good.
TEST_F(ZooKeeperTest, AClientThatFailsToBuildLeavesNoDiscoveryGauges) {
  stats::StatsRegistry registry;
  ClientOptions options;
  options.name = "broken";
  options.stats = &registry;
  options.server_set = MakeSet(zk_->Uri("/svc/broken"));
  SinkStackSpec spec({SinkProvider{"transport", "refusing", [](const SinkContext&, SinkFactory) -> SinkPtr {
    throw Error(make_error_code(Errc::kInvalidArgument), "refusing: bad options");
  }}});
  EXPECT_THROW(ClientCore(options, spec), Error);
  const std::string text = registry.ToPrometheus();
  EXPECT_EQ(text.find("scales_zk_sessions"), std::string::npos) << text;
}

TEST_F(ZooKeeperTest, DataChangesAndDeletesAreFollowed) {
  std::string created = Kazoo(CreateMember("/svc", "127.0.0.1", 1001) + "\n" +
                              CreateMember("/svc", "127.0.0.2", 1002));
  auto first = created.substr(0, created.find('\n'));
  auto set = MakeSet(zk_->Uri("/svc"));
  Recorder rec(*set);
  ASSERT_TRUE(rec.WaitFor(Eps({{"127.0.0.1", 1001}, {"127.0.0.2", 1002}}))) << Show(rec.last());

  // Same node, new data: the endpoint moves; then the member stops being ALIVE; then returns.
  Kazoo(fmt::format("zk.set('{}', {})", first, FinagleMemberPython("127.0.0.1", 1111)));
  ASSERT_TRUE(rec.WaitFor(Eps({{"127.0.0.1", 1111}, {"127.0.0.2", 1002}}))) << Show(rec.last());
  Kazoo(fmt::format("zk.set('{}', {})", first,
                    FinagleMemberPython("127.0.0.1", 1111, {}, "STOPPING")));
  ASSERT_TRUE(rec.WaitFor(Eps({{"127.0.0.2", 1002}}))) << Show(rec.last());
  Kazoo(fmt::format("zk.set('{}', {})", first, FinagleMemberPython("127.0.0.1", 1111)));
  ASSERT_TRUE(rec.WaitFor(Eps({{"127.0.0.1", 1111}, {"127.0.0.2", 1002}}))) << Show(rec.last());
  // Leave.
  Kazoo(fmt::format("zk.delete('{}')", first));
  ASSERT_TRUE(rec.WaitFor(Eps({{"127.0.0.2", 1002}}))) << Show(rec.last());
}

// A TCP proxy in front of the ZooKeeper server that loses one read's reply: once armed, the
// first bytes the client sends that contain `needle` (a read of that node: its path is in the
// request) are not forwarded, and the connection is cut at once (kCut: the read fails with
// ZCONNECTIONLOSS) or goes silent, swallowing everything, until the client gives up on it (kStall:
// after 2/3 of the session timeout the C client fails the read with ZOPERATIONTIMEOUT). Either
// way the client reconnects through the proxy, with the same session; later connections are
// forwarded as they are.
class LossyZkProxy {
 public:
  enum class Action { kCut, kStall };

  explicit LossyZkProxy(int target_port) : target_port_(target_port) {
    listen_fd_ = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr = Loopback(0);
    int one = 1;
    ::setsockopt(listen_fd_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (::bind(listen_fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 || ::listen(listen_fd_, 16) != 0) {
      throw std::runtime_error(std::string("LossyZkProxy: ") + std::strerror(errno));
    }
    socklen_t len = sizeof addr;
    ::getsockname(listen_fd_, reinterpret_cast<sockaddr*>(&addr), &len);
    port_ = ntohs(addr.sin_port);
    acceptor_ = std::thread([this] { AcceptLoop(); });
  }
  ~LossyZkProxy() {
    stopping_ = true;
    acceptor_.join();  // no pump is added after this
    // Joined without mu_: a pump still forwarding takes it in Trips() (joining under it
    // deadlocked the test now and then, when a pump met bytes in its last 50 ms poll).
    std::vector<std::thread> pumps;
    {
      std::lock_guard lock(mu_);
      pumps.swap(pumps_);
    }
    for (auto& t : pumps) t.join();
    ::close(listen_fd_);
  }
  int port() const { return port_; }
  void Arm(std::string needle, Action action) {
    std::lock_guard lock(mu_);
    needle_ = std::move(needle);
    action_ = action;
  }
  // Whether an armed needle was met (and the read lost).
  bool fired() const { return fired_; }

 private:
  static sockaddr_in Loopback(int port) {
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    addr.sin_port = htons(static_cast<uint16_t>(port));
    return addr;
  }
  void AcceptLoop() {
    while (!stopping_) {
      pollfd p{listen_fd_, POLLIN, 0};
      if (::poll(&p, 1, 50) <= 0) continue;
      int client = ::accept(listen_fd_, nullptr, nullptr);
      if (client < 0) continue;
      int server = ::socket(AF_INET, SOCK_STREAM, 0);
      sockaddr_in addr = Loopback(target_port_);
      if (::connect(server, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
        ::close(server);
        ::close(client);
        continue;
      }
      std::lock_guard lock(mu_);
      pumps_.emplace_back([this, client, server] { Pump(client, server); });
    }
  }
  // Forwards both ways until either side closes, the proxy stops, or an armed needle is met.
  void Pump(int client, int server) {
    bool silent = false;
    char buf[65536];
    while (!stopping_) {
      pollfd p[2] = {{client, POLLIN, 0}, {server, POLLIN, 0}};
      if (::poll(p, 2, 50) <= 0) continue;
      if (p[0].revents != 0) {
        ssize_t n = ::recv(client, buf, sizeof buf, 0);
        if (n <= 0) break;
        if (silent) continue;
        if (Trips(std::string_view(buf, static_cast<size_t>(n)), silent)) {
          if (!silent) break;  // kCut
          continue;
        }
        if (::send(server, buf, static_cast<size_t>(n), MSG_NOSIGNAL) != n) break;
      }
      if (p[1].revents != 0) {
        ssize_t n = ::recv(server, buf, sizeof buf, 0);
        if (n <= 0) break;
        if (!silent && ::send(client, buf, static_cast<size_t>(n), MSG_NOSIGNAL) != n) break;
      }
    }
    ::close(client);
    ::close(server);
  }
  // Whether `bytes` from the client meet the armed needle (disarming it); `silent` is set for
  // kStall.
  bool Trips(std::string_view bytes, bool& silent) {
    std::lock_guard lock(mu_);
    if (needle_.empty() || bytes.find(needle_) == std::string_view::npos) return false;
    needle_.clear();
    silent = action_ == Action::kStall;
    fired_ = true;
    return true;
  }

  const int target_port_;
  int listen_fd_ = -1;
  int port_ = 0;
  std::atomic<bool> stopping_{false};
  std::atomic<bool> fired_{false};
  std::mutex mu_;
  std::string needle_;
  Action action_ = Action::kCut;
  std::vector<std::thread> pumps_;
  std::thread acceptor_;
};

// A member's data changes; the read that follows the change loses its reply (the connection is
// cut, or goes silent until the client times it out). The member keeps its last data meanwhile
// (no snapshot without it) and is read again on the reconnect: the change is seen. (Before, a
// lost reply left the member with its old data and no data watch, so no change was ever seen
// again, and a timed-out read dropped the member from the set for good.)
class LostMemberReadTest : public ZooKeeperTest, public ::testing::WithParamInterface<LossyZkProxy::Action> {};

TEST_P(LostMemberReadTest, TheMemberIsKeptAndReadAgain) {
  std::string created = Kazoo(CreateMember("/svc", "127.0.0.1", 1001) + "\n" + CreateMember("/svc", "127.0.0.2", 1002));
  const std::string first = created.substr(0, created.find('\n'));
  LossyZkProxy proxy(zk_->port());
  auto set = MakeSet(fmt::format("zk://127.0.0.1:{}/svc?session_timeout=3s", proxy.port()));
  Recorder rec(*set);
  ASSERT_TRUE(rec.WaitFor(Eps({{"127.0.0.1", 1001}, {"127.0.0.2", 1002}}))) << Show(rec.last());
  const size_t snapshots = rec.count();

  proxy.Arm(first.substr(first.rfind('/') + 1), GetParam());
  Kazoo(fmt::format("zk.set('{}', {})", first, FinagleMemberPython("127.0.0.1", 1111)));
  ASSERT_TRUE(rec.WaitFor(Eps({{"127.0.0.1", 1111}, {"127.0.0.2", 1002}}))) << Show(rec.last()) << "\n"
                                                                              << set->Describe();
  EXPECT_TRUE(proxy.fired()) << "the read of the changed member was not lost: the test proved nothing";
  EXPECT_EQ(rec.count(), snapshots + 1) << "only the change was published (the member was never dropped)";
  EXPECT_GE(set->stats().connection_losses, 1u);
  EXPECT_EQ(set->stats().sessions, 1u) << "the same session throughout";
}

INSTANTIATE_TEST_SUITE_P(CutOrStalled, LostMemberReadTest,
                         ::testing::Values(LossyZkProxy::Action::kCut, LossyZkProxy::Action::kStall),
                         [](const auto& info) {
                           return std::string(info.param == LossyZkProxy::Action::kCut ? "Cut" : "Stalled");
                         });

// Member reads answered with a transient error (ZTHROTTLEDOP: "not executed at all, please
// retry", what a server under load answers). A member never read yet holds back the list until
// it is read (the first list is not partial); a known member keeps its last data (it is not
// dropped until the retry); a member still refused after kTransientMemberReads attempts is
// skipped, so later changes are published, and joins once read. Reads are retried every
// retry_interval.
TEST_F(ZooKeeperTest, TransientReadErrorsNeitherDropNorHideMembers) {
  std::string created = Kazoo(CreateMember("/svc", "127.0.0.1", 1001) + "\n" + CreateMember("/svc", "127.0.0.2", 1002));
  const std::string first = created.substr(0, created.find('\n'));
  const std::string second = created.substr(first.size() + 1, created.find('\n', first.size() + 1) - first.size() - 1);
  ReadErrorInjector proxy(zk_->port());
  proxy.Arm(first.substr(first.rfind('/') + 1), ZTHROTTLEDOP);
  auto set = MakeSet(fmt::format("zk://127.0.0.1:{}/svc?retry_interval=200ms", proxy.port()));
  Recorder rec(*set);
  const Members both = Eps({{"127.0.0.1", 1001}, {"127.0.0.2", 1002}});
  ASSERT_TRUE(rec.WaitFor(both)) << Show(rec.last()) << "\n" << set->Describe();
  ASSERT_EQ(proxy.injected(), 1) << "the first read was not throttled: the test proves nothing";

  // Member 1's data is written again, unchanged (an announcer refreshing it): its re-read is
  // throttled, then retried.
  const uint64_t reads = set->stats().member_reads;
  proxy.Arm(first.substr(first.rfind('/') + 1), ZTHROTTLEDOP);
  Kazoo(fmt::format("zk.set('{}', {})", first, FinagleMemberPython("127.0.0.1", 1001)));
  ASSERT_TRUE(WaitFor([&] { return proxy.injected() == 2 && set->stats().member_reads > reads; }))
      << set->Describe();
  const Members three = Eps({{"127.0.0.1", 1001}, {"127.0.0.2", 1002}, {"127.0.0.3", 1003}});
  Kazoo(CreateMember("/svc", "127.0.0.3", 1003));
  ASSERT_TRUE(rec.WaitFor(three)) << Show(rec.last());

  // Every read throttled: a new member's reads are given up, and member 2 leaving is published.
  proxy.Arm("member_", ZTHROTTLEDOP, 1000);
  Kazoo(CreateMember("/svc", "127.0.0.4", 1004) + "\n" + fmt::format("zk.delete('{}')", second));
  const Members without_2 = Eps({{"127.0.0.1", 1001}, {"127.0.0.3", 1003}});
  ASSERT_TRUE(rec.WaitFor(without_2)) << Show(rec.last()) << "\n" << set->Describe();
  proxy.Arm("", 0, 0);
  const Members with_4 = Eps({{"127.0.0.1", 1001}, {"127.0.0.3", 1003}, {"127.0.0.4", 1004}});
  ASSERT_TRUE(rec.WaitFor(with_4)) << Show(rec.last()) << "\n" << set->Describe();
  std::string published;
  for (const Members& m : rec.all()) published += Show(m);
  EXPECT_EQ(published, Show(both) + Show(three) + Show(without_2) + Show(with_4));
}

// A member nobody may read (its ACL grants no READ) is read again after each refusal, but less
// and less often (max_retry_interval), so that a fleet of clients does not poll the ensemble
// every retry_interval for as long as the member stays locked. It used to be re-read every
// retry_interval for ever: some 60 reads in the 3 s below. Once every member is read the waits
// start again from retry_interval.
TEST_F(ZooKeeperTest, AnUnreadableMemberIsReadAgainLessAndLessOften) {
  Kazoo("from kazoo.security import make_acl\n" + CreateMember("/locked/svc", "127.0.0.1", 1001) +
        "\nzk.create('/locked/svc/member_locked', " + FinagleMemberPython("127.0.0.2", 1002) +
        ", acl=[make_acl('world', 'anyone', write=True, delete=True, admin=True)])");
  ReadErrorInjector proxy(zk_->port());  // for the last step
  auto set = MakeSet(fmt::format("zk://127.0.0.1:{}/locked/svc?retry_interval=50ms&max_retry_interval=1600ms",
                                 proxy.port()));
  Recorder rec(*set);
  ASSERT_TRUE(rec.WaitFor(Eps({{"127.0.0.1", 1001}}))) << Show(rec.last()) << "\n" << set->Describe();
  ASSERT_TRUE(WaitFor([&] { return set->stats().read_retries >= 1; })) << set->Describe();

  // Waits of 50 ms, then 50-100, 100-200, 200-400, 400-800, 800-1600, 1600 ms: 4 to 8 retries
  // in 3 s (fewer on a slow machine, never more).
  const uint64_t before = set->stats().read_retries;
  std::this_thread::sleep_for(3s);
  const uint64_t during = set->stats().read_retries - before;
  EXPECT_LE(during, 9u) << "the unreadable member was not read less often: " << set->Describe();
  EXPECT_GE(during, 2u) << "the unreadable member was not read again: " << set->Describe();
  EXPECT_EQ(set->path_status().unreadable, 1u) << set->Describe();

  // Readable again: it joins at the next retry (at most max_retry_interval away).
  Kazoo("from kazoo.security import OPEN_ACL_UNSAFE\nzk.set_acls('/locked/svc/member_locked', OPEN_ACL_UNSAFE)");
  const Members both = Eps({{"127.0.0.1", 1001}, {"127.0.0.2", 1002}});
  ASSERT_TRUE(rec.WaitFor(both, 10s)) << set->Describe();
  EXPECT_EQ(set->path_status().unreadable, 0u) << set->Describe();

  // Changed, and its reads refused again (by the relay: the ensemble sends no data watch event
  // to a session that may not read the node, so a real ACL cannot be used here): the retries
  // start from 50 ms again, three within 1,600 ms (which the wait reached before would allow
  // only one). The member keeps its last data meanwhile.
  const uint64_t refused = set->stats().read_retries;
  proxy.Arm("member_locked", ZNOAUTH, 1000);
  Kazoo("zk.set('/locked/svc/member_locked', " + FinagleMemberPython("127.0.0.2", 1003) + ")");
  ASSERT_TRUE(WaitFor([&] { return set->stats().read_retries >= refused + 1; }, 10s)) << set->Describe();
  const auto first = std::chrono::steady_clock::now();
  ASSERT_TRUE(WaitFor([&] { return set->stats().read_retries >= refused + 3; }, 10s)) << set->Describe();
  EXPECT_LT(std::chrono::steady_clock::now() - first, 1600ms)
      << "the waits did not start again from retry_interval: " << set->Describe();
  EXPECT_EQ(rec.last(), both) << Show(rec.last());
  proxy.Arm("", 0, 0);
  ASSERT_TRUE(rec.WaitFor(Eps({{"127.0.0.1", 1001}, {"127.0.0.2", 1003}}), 10s)) << set->Describe();
}

TEST_F(ZooKeeperTest, PathCreatedLateThenDeleted) {
  auto set = MakeSet(zk_->Uri("/late/svc"));
  Recorder rec(*set);
  // A missing path is a known, empty server set.
  ASSERT_TRUE(rec.WaitFor({})) << Show(rec.last());
  EXPECT_NE(set->Describe().find("does not exist"), std::string::npos) << set->Describe();

  Kazoo(CreateMember("/late/svc", "127.0.0.1", 1001));
  ASSERT_TRUE(rec.WaitFor(Eps({{"127.0.0.1", 1001}}))) << Show(rec.last());
  Kazoo(CreateMember("/late/svc", "127.0.0.2", 1002));
  ASSERT_TRUE(rec.WaitFor(Eps({{"127.0.0.1", 1001}, {"127.0.0.2", 1002}})));

  // Deleting the path: all members leave; re-creating it is noticed again.
  Kazoo("zk.delete('/late/svc', recursive=True)");
  ASSERT_TRUE(rec.WaitFor({})) << Show(rec.last());
  Kazoo(CreateMember("/late/svc", "127.0.0.3", 1003));
  ASSERT_TRUE(rec.WaitFor(Eps({{"127.0.0.3", 1003}}))) << Show(rec.last());
}

// path_missing() / path_status() tell a missing path from an existing empty one (scales
// serverset used to search Describe()'s text for "does not exist").
TEST_F(ZooKeeperTest, PathStatusTellsAMissingPathFromAnEmptyOne) {
  auto set = MakeSet(zk_->Uri("/gone/svc"));
  Recorder rec(*set);
  ASSERT_TRUE(rec.WaitFor({})) << Show(rec.last());
  EXPECT_TRUE(set->path_missing()) << set->Describe();
  EXPECT_TRUE(set->path_status().known);
  EXPECT_FALSE(set->path_status().exists);

  Kazoo("zk.ensure_path('/gone/svc')");
  ASSERT_TRUE(WaitFor([&] { return !set->path_missing(); })) << set->Describe();
  EXPECT_TRUE(set->path_status().exists);
  EXPECT_EQ(set->path_status().member_nodes, 0u);
  EXPECT_EQ(rec.last(), Members{});

  Kazoo("zk.delete('/gone/svc')");
  ASSERT_TRUE(WaitFor([&] { return set->path_missing(); })) << set->Describe();
  EXPECT_NE(set->Describe().find("path /gone/svc does not exist"), std::string::npos) << set->Describe();
}

// An empty member list said only "connected, 0 members" (or "(1 nodes, 0 malformed)" for a
// member that is not ALIVE): nothing told an existing empty path from one whose members were
// all skipped. Describe() (and so `scales serverset` and /admin) now says which, and how many.
TEST_F(ZooKeeperTest, DescribeExplainsAnEmptyMemberList) {
  Kazoo("zk.ensure_path('/empty/svc/config')");
  auto empty = MakeSet(zk_->Uri("/empty/svc"));
  Recorder empty_rec(*empty);
  ASSERT_TRUE(empty_rec.WaitFor({})) << Show(empty_rec.last());
  EXPECT_NE(empty->Describe().find(
                "(connected, 0 members (path /empty/svc exists with no member_ children; 1 other children ignored))"),
            std::string::npos)
      << empty->Describe();

  Kazoo("zk.create('/broken/svc/member_1', b'{not json', makepath=True)\n"
        "zk.create('/broken/svc/member_2', b'')");
  auto broken = MakeSet(zk_->Uri("/broken/svc"));
  Recorder broken_rec(*broken);
  ASSERT_TRUE(broken_rec.WaitFor({})) << Show(broken_rec.last());
  EXPECT_NE(broken->Describe().find("(connected, 0 members (2 member nodes: 2 malformed))"), std::string::npos)
      << broken->Describe();
  EXPECT_EQ(broken->path_status().malformed, 2u);

  // With #http: one member not ALIVE, one ALIVE without "http", one nobody may read.
  Kazoo("from kazoo.security import make_acl\n" + CreateMember("/down/svc", "127.0.0.1", 1001, {{"http", 2001}}, "STOPPING") +
        "\n" + CreateMember("/down/svc", "127.0.0.2", 1002) +
        "\nzk.create('/down/svc/member_locked', " + FinagleMemberPython("127.0.0.3", 1003, {{"http", 2003}}) +
        ", acl=[make_acl('world', 'anyone', write=True, delete=True, admin=True)])");
  auto down = MakeSet(zk_->Uri("/down/svc#http"));
  Recorder down_rec(*down);
  ASSERT_TRUE(down_rec.WaitFor({})) << Show(down_rec.last());
  ASSERT_TRUE(WaitFor([&] {
    return down->Describe().find(
               "(connected, 0 members (3 member nodes: 1 unreadable, 1 not ALIVE, 1 without endpoint 'http'))") !=
           std::string::npos;
  })) << down->Describe();
  const auto status = down->path_status();
  EXPECT_EQ(status.member_nodes, 3u);
  EXPECT_EQ(status.unreadable, 1u);
  EXPECT_EQ(status.not_alive, 1u);
  EXPECT_EQ(status.without_endpoint, 1u);
  EXPECT_FALSE(down->path_missing());
}

TEST_F(ZooKeeperTest, AnnouncerRegistersAndRemovesItsMember) {
  ServiceInstance instance;
  instance.service_endpoint = {"127.0.0.1", 4242};
  instance.additional_endpoints["admin"] = {"127.0.0.1", 4343};
  auto uri = ScalesUriParser::Parse(zk_->Uri("/deep/path/svc"));
  auto announcer = std::make_unique<Announcer>(uri, instance);
  ASSERT_TRUE(announcer->WaitAnnounced(20s)) << announcer->Describe();
  EXPECT_TRUE(announcer->node_path().starts_with("/deep/path/svc/member_"))
      << announcer->node_path();
  // Kazoo sees Finagle's JSON, ephemeral.
  std::string out = Kazoo(fmt::format(
      "d, st = zk.get('{}')\nm = json.loads(d)\n"
      "print(m['serviceEndpoint']['port'], m['additionalEndpoints']['admin']['port'], "
      "m['status'], st.ephemeralOwner != 0)",
      announcer->node_path()));
  EXPECT_EQ(out, "4242 4343 ALIVE True\n");

  auto set = MakeSet(zk_->Uri("/deep/path/svc#admin"));
  Recorder rec(*set);
  ASSERT_TRUE(rec.WaitFor(Eps({{"127.0.0.1", 4343}}))) << Show(rec.last());

  // Expiring the announcer's session: the member is re-created under the new session.
  announcer.reset();
  ASSERT_TRUE(rec.WaitFor({})) << Show(rec.last());
}

// The reply to the announcer's member create is lost with its connection, but the server made
// the node and the session lives on. On reconnecting, the announcer must find and adopt that
// node, not create a second member (which would stay, doubling its share of the traffic, for
// the life of the session).
TEST_F(ZooKeeperTest, AnnouncerAdoptsTheMemberWhoseCreateReplyWasLost) {
  CreateReplyCutter cutter(zk_->port(), "/cut/svc/member_");
  Kazoo("zk.ensure_path('/cut/svc')");
  ServiceInstance instance;
  instance.service_endpoint = {"127.0.0.7", 7007};
  Announcer announcer(ScalesUriParser::Parse(fmt::format("zk://127.0.0.1:{}/cut/svc", cutter.port())), instance);
  ASSERT_TRUE(announcer.WaitAnnounced(20s)) << announcer.Describe();
  EXPECT_TRUE(cutter.cut()) << "the create's reply went through";
  const auto session = announcer.session();
  ASSERT_TRUE(session);
  // Every member under the path, with its owner: exactly one, the announced node, ours.
  EXPECT_EQ(ChildrenAndOwners("/cut/svc"), fmt::format("{} {}\n", announcer.node_path(), session->first));
  // The members were listed after a sync: the server the session reconnected to may not have
  // applied the create yet (with an ensemble; a lagging follower would hide the node, and a
  // second member would be made).
  const std::vector<int32_t> requests = cutter.RequestsAfterCut("/cut/svc");
  ASSERT_GE(requests.size(), 2u);
  EXPECT_EQ(requests[0], 9) << "sync";
  EXPECT_EQ(requests[1], 12) << "getChildren2";
}

// Shutdown() while the announcer's member create is uncertain: its reply was lost with the
// connection (the server made the node) and the connection is still down. Shutdown() waits,
// within its 2 s, for the reconnect, finds the member the lost create made and deletes it.
// (It used to finish at once, as no member was known: the node stayed for a session timeout.)
TEST_F(ZooKeeperTest, AnnouncerShutdownDeletesTheMemberOfALostCreate) {
  CreateReplyCutter cutter(zk_->port(), "/lost/svc/member_", /*refuse_after_cut=*/true);
  Kazoo("zk.ensure_path('/lost/svc')");
  ServiceInstance instance;
  instance.service_endpoint = {"127.0.0.7", 7007};
  Announcer announcer(
      ScalesUriParser::Parse(fmt::format("zk://127.0.0.1:{}/lost/svc?session_timeout=10s", cutter.port())),
      instance);
  ASSERT_TRUE(WaitFor([&] { return cutter.cut() && cutter.refused() >= 1; }, 20s)) << announcer.Describe();
  ASSERT_EQ(Kazoo("print(len(zk.get_children('/lost/svc')))"), "1\n") << "the server made the member";
  auto shutdown = std::async(std::launch::async, [&] { announcer.Shutdown(); });
  const uint64_t refused = cutter.refused();
  ASSERT_TRUE(WaitFor(
      [&] { return cutter.refused() > refused || shutdown.wait_for(0s) == std::future_status::ready; }, 10s));
  cutter.SetRefusing(false);
  ASSERT_EQ(shutdown.wait_for(10s), std::future_status::ready);
  EXPECT_EQ(Kazoo("print(zk.get_children('/lost/svc'))"), "[]\n") << "the lost create's member outlived the announcer";
  EXPECT_TRUE(announcer.node_path().empty());
}

// Another client deletes the announcer's member while its session lives (an operator, a
// cleanup script): the announcer announces again, as Finagle's does (twitter-commons
// Group.ActiveMembership re-joins on NodeDeleted), once: its session owns one member. The
// delete by Shutdown() starts no new member. (The member used to stay gone for the life of the
// session.)
TEST_F(ZooKeeperTest, AnnouncerAnnouncesAgainWhenItsMemberIsDeleted) {
  test::LogCapture log;
  ServiceInstance instance;
  instance.service_endpoint = {"127.0.0.1", 4242};
  Announcer announcer(ScalesUriParser::Parse(zk_->Uri("/gone/svc")), instance);
  ASSERT_TRUE(announcer.WaitAnnounced(20s)) << announcer.Describe();
  const std::string node = announcer.node_path();
  Kazoo(fmt::format("zk.delete('{}')", node));
  ASSERT_TRUE(WaitFor([&] {
    const std::string now = announcer.node_path();
    return !now.empty() && now != node;
  })) << announcer.Describe();
  const auto session = announcer.session();
  ASSERT_TRUE(session);
  EXPECT_EQ(ChildrenAndOwners("/gone/svc"), fmt::format("{} {}\n", announcer.node_path(), session->first));

  announcer.Shutdown();  // its delete's watch event comes before the reply that ends the wait
  EXPECT_EQ(Kazoo("print(zk.get_children('/gone/svc'))"), "[]\n");
  const std::string lines = log.All();
  size_t again = 0;
  for (size_t at = lines.find("announcing again"); at != std::string::npos; at = lines.find("announcing again", at + 1)) {
    ++again;
  }
  EXPECT_EQ(again, 1u) << lines;
}

// Shutdown() while the connection is down (a network blip): it waits, within its 2 s, for the
// reconnect and then deletes the member. (It used to give up at once, and closing a session
// that is not connected tells the server nothing: the member stayed for a session timeout.)
TEST_F(ZooKeeperTest, AnnouncerShutdownDeletesTheMemberAfterAReconnect) {
  test::ZkFrameRelay relay(zk_->port(), [](std::string&, bool) { return test::ZkFrameRelay::Verdict::kPass; });
  ServiceInstance instance;
  instance.service_endpoint = {"127.0.0.1", 4242};
  Announcer announcer(
      ScalesUriParser::Parse(fmt::format("zk://127.0.0.1:{}/blip/svc?session_timeout=10s", relay.port())), instance);
  ASSERT_TRUE(announcer.WaitAnnounced(20s)) << announcer.Describe();
  const std::string node = announcer.node_path();
  // The connection drops; once the announcer tries to reconnect (it saw the loss), Shutdown(),
  // and the relay lets it back in after one more refused attempt.
  relay.SetRefusing(true);
  ASSERT_TRUE(WaitFor([&] { return relay.refused() >= 1; }, 10s));
  const auto shutdown_started = std::chrono::steady_clock::now();
  auto shutdown = std::async(std::launch::async, [&] { announcer.Shutdown(); });
  const uint64_t refused = relay.refused();
  ASSERT_TRUE(WaitFor([&] { return relay.refused() > refused || shutdown.wait_for(0s) == std::future_status::ready; },
                      10s));
  relay.SetRefusing(false);
  ASSERT_EQ(shutdown.wait_for(10s), std::future_status::ready);
  const auto took = std::chrono::steady_clock::now() - shutdown_started;
  EXPECT_EQ(Kazoo(fmt::format("print(zk.exists('{}'))", node)), "None\n")
      << "the member outlived the announcer; Shutdown() took "
      << std::chrono::duration_cast<std::chrono::milliseconds>(took).count() << " ms";
}

TEST_F(ZooKeeperTest, SessionExpiryKeepsMembersThenRereads) {
  test::LogCapture log;
  Kazoo(CreateMember("/svc", "127.0.0.1", 1001));
  auto set = MakeSet(zk_->Uri("/svc?session_timeout=4s"));
  Recorder rec(*set);
  ASSERT_TRUE(rec.WaitFor(Eps({{"127.0.0.1", 1001}}))) << Show(rec.last());
  ServiceInstance instance;
  instance.service_endpoint = {"127.0.0.9", 9009};
  Announcer announcer(ScalesUriParser::Parse(zk_->Uri("/svc")), instance);
  ASSERT_TRUE(rec.WaitFor(Eps({{"127.0.0.1", 1001}, {"127.0.0.9", 9009}}))) << Show(rec.last());
  size_t snapshots = rec.count();

  auto session = set->session();
  ASSERT_TRUE(session);
  ASSERT_TRUE(ExpireSessionUntil(zk_->connect_string(), *session,
                                 [&] { return set->stats().session_expirations >= 1; }))
      << set->Describe();
  ASSERT_TRUE(WaitFor([&] { return set->stats().sessions >= 2; })) << set->Describe();
  // The same members throughout: no empty or partial snapshot was published.
  EXPECT_EQ(rec.last(), Eps({{"127.0.0.1", 1001}, {"127.0.0.9", 9009}}));
  EXPECT_EQ(rec.count(), snapshots);
  // The session events were logged, naming the ensemble.
  const std::string zk = "zookeeper " + zk_->connect_string() + ": ";
  EXPECT_TRUE(log.Has({zk, "session expired"})) << log.All();
  EXPECT_TRUE(log.Has({zk, "connected, new session"})) << log.All();

  // The watches of the new session work.
  Kazoo(CreateMember("/svc", "127.0.0.2", 1002));
  ASSERT_TRUE(rec.WaitFor(Eps({{"127.0.0.1", 1001}, {"127.0.0.2", 1002}, {"127.0.0.9", 9009}})))
      << Show(rec.last());

  // The announcer's session expires: its member is re-created under a new session.
  auto before = announcer.node_path();
  auto announcer_session = announcer.session();
  ASSERT_TRUE(announcer_session);
  ASSERT_TRUE(ExpireSessionUntil(zk_->connect_string(), *announcer_session, [&] {
    auto now = announcer.node_path();
    return !now.empty() && now != before;
  })) << announcer.Describe();
  ASSERT_TRUE(rec.WaitFor(Eps({{"127.0.0.1", 1001}, {"127.0.0.2", 1002}, {"127.0.0.9", 9009}})))
      << Show(rec.last());
}

TEST_F(ZooKeeperTest, ServerRestartKeepsMembersAndRecovers) {
  Kazoo(CreateMember("/svc", "127.0.0.1", 1001));
  auto set = MakeSet(zk_->Uri("/svc?session_timeout=2s"));
  Recorder rec(*set);
  ASSERT_TRUE(rec.WaitFor(Eps({{"127.0.0.1", 1001}}))) << Show(rec.last());
  ServiceInstance instance;
  instance.service_endpoint = {"127.0.0.9", 9009};
  Announcer announcer(ScalesUriParser::Parse(zk_->Uri("/svc?session_timeout=2s")), instance);
  ASSERT_TRUE(rec.WaitFor(Eps({{"127.0.0.1", 1001}, {"127.0.0.9", 9009}}))) << Show(rec.last());

  zk_->Stop();
  ASSERT_TRUE(WaitFor([&] { return set->Describe().find("not connected") != std::string::npos; }))
      << set->Describe();
  // Down for longer than the session timeout: on reconnect the sessions have expired.
  std::this_thread::sleep_for(3s);
  EXPECT_EQ(rec.last(), Eps({{"127.0.0.1", 1001}, {"127.0.0.9", 9009}}));
  EXPECT_NE(set->Describe().find("keeping 2 members"), std::string::npos) << set->Describe();
  zk_->Start();
  ASSERT_TRUE(WaitFor([&] { return set->Describe().find("connected, 2 members") == 0 ||
                                   set->Describe().find("(connected, ") != std::string::npos; }))
      << set->Describe();
  // New members are seen; the announcer's member is back (re-created after expiry).
  Kazoo(CreateMember("/svc", "127.0.0.2", 1002));
  ASSERT_TRUE(rec.WaitFor(Eps({{"127.0.0.1", 1001}, {"127.0.0.2", 1002}, {"127.0.0.9", 9009}})))
      << Show(rec.last()) << set->Describe();
}

TEST(ZooKeeperDownTest, OpenTimesOutClearlyThenRecovers) {
  SKIP_WITHOUT_ZOOKEEPER();
  ZooKeeperServer zk(0, /*start=*/false);
  TestHttpServer server("ts");
  http::HttpOptions options;
  options.client.name = "zkdown";
  options.client.open_timeout = 1500ms;
  options.client.timeout = 5s;
  auto start = std::chrono::steady_clock::now();
  try {
    Http::NewClient(zk.Uri("/svc"), options);
    ADD_FAILURE() << "open succeeded without ZooKeeper";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), make_error_code(Errc::kOpenTimeout)) << e.what();
    EXPECT_NE(std::string(e.what()).find("not connected"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find(zk.Uri("/svc")), std::string::npos) << e.what();
  }
  EXPECT_LT(std::chrono::steady_clock::now() - start, 5s);

  // The server set keeps retrying in the background: a later start recovers.
  auto set = MakeSet(zk.Uri("/svc"));
  Recorder rec(*set);
  EXPECT_TRUE(WaitFor(
      [&] { return set->Describe().find("not connected: connection refused") != std::string::npos; },
      10s))
      << set->Describe() << " / " << set->last_error();
  zk.Start();
  RunKazoo(zk.connect_string(), CreateMember("/svc", "127.0.0.1", server.port()));
  ASSERT_TRUE(rec.WaitFor(Eps({{"127.0.0.1", server.port()}}), 30s)) << set->Describe();
  auto client = Http::NewClient(zk.Uri("/svc"), options);
  EXPECT_EQ(client.Get("/name").Header("X-Server"), "ts");
}

// Runs `concurrency` callers in a closed loop until stopped; counts every completion.
struct Load {
  http::HttpClient client;
  std::atomic<bool> stop{false};
  std::atomic<int64_t> started{0}, completed{0}, failed{0};
  std::string first_error;  // written once, by the first failure
  std::atomic<int> active{0};
  std::mutex mu;
  std::map<std::string, int64_t> by_server;
  std::promise<void> drained;

  void Start(int concurrency) {
    active = concurrency;
    for (int i = 0; i < concurrency; ++i) Next();
  }
  void Next() {
    if (stop) {
      if (--active == 0) drained.set_value();
      return;
    }
    ++started;
    client.AsyncGet("/name", [this](error_code ec, http::Response r) {
      ++completed;
      if (ec) {
        if (failed++ == 0) first_error = ec.message();
      } else {
        std::lock_guard lock(mu);
        ++by_server[std::string(r.Header("X-Server"))];
      }
      Next();
    });
  }
  int64_t Count(const std::string& name) {
    std::lock_guard lock(mu);
    return by_server[name];
  }
  void StopAndWait() {
    if (waited) return;
    waited = true;
    stop = true;
    ASSERT_EQ(drained.get_future().wait_for(20s), std::future_status::ready)
        << "calls did not all complete";
  }
  // A failed ASSERT leaves the test early: the calls must still end before the Load goes.
  ~Load() {
    if (active.load() > 0) StopAndWait();
  }
  bool waited = false;
};

http::HttpOptions LoadOptions() {
  http::HttpOptions o;
  o.client.name = "zkload";
  RuntimeOptions r;
  r.threads = 2;
  o.client.runtime = std::make_shared<Runtime>(r);
  o.client.timeout = 5s;
  o.client.open_timeout = 20s;
  o.resurrector.initial_backoff = 100ms;
  o.resurrector.max_backoff = 400ms;
  return o;
}

std::unique_ptr<Announcer> Announce(const std::string& uri, const TestHttpServer& server) {
  ServiceInstance instance;
  instance.service_endpoint = {"127.0.0.1", static_cast<uint16_t>(server.port())};
  auto a = std::make_unique<Announcer>(ScalesUriParser::Parse(uri), instance);
  EXPECT_TRUE(a->WaitAnnounced(20s)) << a->Describe();
  return a;
}

TEST_F(ZooKeeperTest, JoinAndLeaveUnderLoad) {
  std::vector<std::unique_ptr<TestHttpServer>> servers;
  for (int i = 0; i < 3; ++i) servers.push_back(std::make_unique<TestHttpServer>(fmt::format("s{}", i)));
  const std::string uri = zk_->Uri("/load/svc");
  auto a0 = Announce(uri, *servers[0]);
  Load load;
  // The heap balancer uses every member at once; aperture (the default) may keep a joiner
  // idle while the others carry the load, which is not what this test is about.
  auto options = LoadOptions();
  options.balancer.kind = BalancerKind::kHeap;
  load.client = Http::NewClient(uri, options);
  load.Start(8);
  ASSERT_TRUE(WaitFor([&] { return load.Count("s0") > 50; }));

  // Joins: one through our announcer, one written by kazoo.
  auto a1 = Announce(uri, *servers[1]);
  RunKazoo(zk_->connect_string(), CreateMember("/load/svc", "127.0.0.1", servers[2]->port()));
  ASSERT_TRUE(WaitFor([&] { return load.Count("s1") > 50 && load.Count("s2") > 50; }))
      << load.Count("s1") << " " << load.Count("s2");

  // Leave: the announcer removes its member; s0 then gets no more traffic (it still runs).
  a0.reset();
  ASSERT_TRUE(WaitFor([&] {
    int64_t c = load.Count("s0");
    std::this_thread::sleep_for(300ms);
    return load.Count("s0") == c;
  }));
  int64_t s0 = load.Count("s0"), s1 = load.Count("s1");
  ASSERT_TRUE(WaitFor([&] { return load.Count("s1") > s1 + 100; }));
  EXPECT_EQ(load.Count("s0"), s0);

  load.StopAndWait();
  EXPECT_EQ(load.started.load(), load.completed.load()) << "every request completes exactly once";
  EXPECT_EQ(load.failed.load(), 0);
}

TEST_F(ZooKeeperTest, TrafficContinuesThroughSessionExpiryAndServerRestart) {
  // The client's metrics, read through the Prometheus export. Declared first: it must outlive
  // the client's event loops, which release the client's sinks (and their gauges) last.
  stats::StatsRegistry registry;
  TestHttpServer server("s0");
  const std::string uri = zk_->Uri("/svc?session_timeout=2s");
  auto announcer = Announce(uri, server);
  // The client's server set, given explicitly so that the test can expire its session.
  auto set = MakeSet(uri);
  auto options = LoadOptions();
  options.client.server_set = set;
  options.client.stats = &registry;
  Load load;
  load.client = Http::NewClient(uri, options);
  load.Start(4);
  ASSERT_TRUE(WaitFor([&] { return load.Count("s0") > 20; }));

  // The client's session expires (the announcer's expiry, which really removes the member
  // for a moment, is tested in SessionExpiryKeepsMembersThenRereads).
  ASSERT_TRUE(ExpireSessionUntil(zk_->connect_string(), *set->session(),
                                 [&] { return set->stats().sessions >= 2; }))
      << set->Describe();
  EXPECT_EQ(set->stats().snapshots, 1u) << "the members never changed";
  int64_t mark = load.completed;
  ASSERT_TRUE(WaitFor([&] { return load.completed > mark + 100; }));

  // The server restarts: the members are kept while it is down, and after.
  zk_->Stop();
  mark = load.completed;
  ASSERT_TRUE(WaitFor([&] { return load.completed > mark + 100; }));
  zk_->Start();
  ASSERT_TRUE(WaitFor([&] { return set->Describe().find("(connected") != std::string::npos; }))
      << set->Describe();
  mark = load.completed;
  ASSERT_TRUE(WaitFor([&] { return load.completed > mark + 100; }));
  EXPECT_EQ(set->members(), Eps({{"127.0.0.1", server.port()}}));
  // The client exports what its server set went through.
  test::PromText prom = test::ParsePrometheusText(registry.ToPrometheus());
  const test::PromLabels client{{"client", "zkload"}};
  EXPECT_GE(prom.Value("scales_zk_sessions", client).value_or(0), 2);
  EXPECT_GE(prom.Value("scales_zk_session_expirations", client).value_or(0), 1);
  EXPECT_GE(prom.Value("scales_zk_connection_losses", client).value_or(0), 1);
  EXPECT_EQ(prom.Value("scales_discovery_updates", client), 1);
  EXPECT_EQ(prom.Value("scales_discovery_malformed_members", client), 0);
  EXPECT_EQ(prom.Value("scales_discovery_read_retries", client), 0);
  load.StopAndWait();
  EXPECT_EQ(load.started.load(), load.completed.load()) << "every request completes exactly once";
  EXPECT_EQ(load.failed.load(), 0) << load.first_error;
}

// Kazoo's script creating a server set at `path` with one member (127.0.0.1:1001), readable only
// by user "svc" with `password` (digest ACL).
std::string DigestProtectedSetScript(const std::string& connect_string, const std::string& path,
                                     const std::string& password) {
  return "from kazoo.security import make_digest_acl\n"
         "acl = [make_digest_acl('svc', '" + password + "', all=True)]\n"
         "z2 = KazooClient(hosts='" + connect_string + "', auth_data=[('digest', 'svc:" + password + "')])\n"
         "z2.start(timeout=10)\n"
         "z2.create('" + path + "', b'', acl=acl)\n"
         "z2.create('" + path + "/member_', " + FinagleMemberPython("127.0.0.1", 1001) +
         ", acl=acl, sequence=True)\n"
         "z2.stop()";
}

TEST_F(ZooKeeperTest, DigestAuthentication) {
  Kazoo(DigestProtectedSetScript(zk_->connect_string(), "/secure", "s3cr:et"));
  auto set = MakeSet(zk_->Uri("/secure?auth=digest:svc:s3cr:et"));
  Recorder rec(*set);
  ASSERT_TRUE(rec.WaitFor(Eps({{"127.0.0.1", 1001}}))) << set->Describe();
  EXPECT_EQ(set->Describe().find("s3cr"), std::string::npos) << "no password in descriptions";

  // Without the credentials the members stay unknown and Describe() says why.
  auto denied = MakeSet(zk_->Uri("/secure"));
  ASSERT_TRUE(WaitFor([&] { return denied->Describe().find("not authenticated") != std::string::npos; }))
      << denied->Describe() << " / " << denied->last_error();
  EXPECT_FALSE(denied->members());
}

// A password holding '&', '#', '%' or a space could not be written in a zk:// URI: the query
// values were not percent-decoded. Escaped, it authenticates.
TEST_F(ZooKeeperTest, DigestAuthenticationWithAnEscapedPassword) {
  Kazoo(DigestProtectedSetScript(zk_->connect_string(), "/escaped", "p&ss #%x"));
  auto set = MakeSet(zk_->Uri("/escaped?auth=digest:svc:p%26ss%20%23%25x"));
  Recorder rec(*set);
  ASSERT_TRUE(rec.WaitFor(Eps({{"127.0.0.1", 1001}}))) << set->Describe() << " / " << set->last_error();
  EXPECT_NE(set->Describe().find("auth=digest:***"), std::string::npos) << set->Describe();
  for (const char* secret : {"p&ss", "p%26ss", "#%x", "%23%25x"}) {
    EXPECT_EQ(set->Describe().find(secret), std::string::npos) << "no part of the password in descriptions";
  }
}

TEST_F(ZooKeeperTest, AnnouncerRetriesACreateTheEnsembleRefused) {
  // Anyone may read the server set's node (and change its permissions) but no one may create
  // in it: the announcer's create fails (no permission); Describe() says so, and it tries again
  // every retry_interval, so it announces once the permission is granted. (It used to give up
  // after the first refusal.)
  Kazoo("from kazoo.security import make_acl\n"
        "zk.create('/locked', b'', acl=[make_acl('world', 'anyone', read=True, admin=True)])");
  ServiceInstance instance;
  instance.service_endpoint = {"127.0.0.9", 9009};
  Announcer announcer(ScalesUriParser::Parse(zk_->Uri("/locked?retry_interval=200ms")), instance);
  ASSERT_TRUE(WaitFor([&] { return announcer.Describe().find("not authenticated") != std::string::npos; }))
      << announcer.Describe();
  EXPECT_NE(announcer.Describe().find("not announced: create /locked/member_: not authenticated, retrying"),
            std::string::npos)
      << announcer.Describe();
  EXPECT_TRUE(announcer.node_path().empty());
  Kazoo("from kazoo.security import OPEN_ACL_UNSAFE\nzk.set_acls('/locked', OPEN_ACL_UNSAFE)");
  ASSERT_TRUE(announcer.WaitAnnounced(10s)) << announcer.Describe();
  EXPECT_EQ(announcer.node_path().rfind("/locked/member_", 0), 0u) << announcer.node_path();
  auto set = MakeSet(zk_->Uri("/locked"));
  Recorder rec(*set);
  ASSERT_TRUE(rec.WaitFor(Eps({{"127.0.0.9", 9009}}))) << Show(rec.last());
}

// An IPv6 literal in a zk:// URI (here the IPv4-mapped form of 127.0.0.1, so the connection
// still goes to the loopback server): libzookeeper needs it without the URI's brackets, or it
// cannot resolve the host and never connects.
TEST_F(ZooKeeperTest, AnIpv6LiteralHostConnects) {
  Kazoo(CreateMember("/v6", "127.0.0.1", 1001));
  auto set = MakeSet("zk://[::ffff:127.0.0.1]:" + std::to_string(zk_->port()) + "/v6");
  Recorder rec(*set);
  ASSERT_TRUE(rec.WaitFor(Eps({{"127.0.0.1", 1001}}))) << set->Describe();
  ServiceInstance instance;
  instance.service_endpoint = {"127.0.0.9", 9009};
  Announcer announcer(ScalesUriParser::Parse("zk://[::ffff:127.0.0.1]:" + std::to_string(zk_->port()) + "/v6"),
                      instance);
  ASSERT_TRUE(announcer.WaitAnnounced(10s)) << announcer.Describe();
  ASSERT_TRUE(rec.WaitFor(Eps({{"127.0.0.1", 1001}, {"127.0.0.9", 9009}}))) << Show(rec.last());
}

// The announcer's path exists in part under an ancestor that forbids creating children (a
// shared root): creating that existing part answers "not authenticated" rather than "exists",
// because the server checks the parent's permission first. The announcer must go on below it
// (it used to retry that create for ever and never announce).
TEST_F(ZooKeeperTest, AnnouncerCreatesItsPathBelowAnAncestorItMayNotCreateIn) {
  Kazoo("from kazoo.security import make_acl, OPEN_ACL_UNSAFE\n"
        "zk.create('/shared', b'')\n"
        "zk.create('/shared/services', b'', acl=OPEN_ACL_UNSAFE)\n"
        "zk.set_acls('/shared', [make_acl('world', 'anyone', read=True, write=True, delete=True, admin=True)])");
  ServiceInstance instance;
  instance.service_endpoint = {"127.0.0.9", 9009};
  Announcer announcer(ScalesUriParser::Parse(zk_->Uri("/shared/services/users?retry_interval=200ms")), instance);
  ASSERT_TRUE(announcer.WaitAnnounced(10s)) << announcer.Describe();
  EXPECT_EQ(announcer.node_path().rfind("/shared/services/users/member_", 0), 0u) << announcer.node_path();
  auto set = MakeSet(zk_->Uri("/shared/services/users"));
  Recorder rec(*set);
  ASSERT_TRUE(rec.WaitFor(Eps({{"127.0.0.9", 9009}}))) << Show(rec.last());
  // A missing ancestor under a parent that forbids it is still a clear failure.
  Announcer refused(ScalesUriParser::Parse(zk_->Uri("/shared/other/users?retry_interval=200ms")), instance);
  ASSERT_TRUE(WaitFor([&] { return refused.Describe().find("not authenticated") != std::string::npos; }))
      << refused.Describe();
  EXPECT_NE(refused.Describe().find("create parents of /shared/other/users: not authenticated"), std::string::npos)
      << refused.Describe();
}

TEST_F(ZooKeeperTest, ChrootResolvesThePathBelowIt) {
  Kazoo(CreateMember("/prod/svc", "127.0.0.1", 1001) + "\n" +
        CreateMember("/svc", "127.0.0.2", 1002));
  auto chrooted = MakeSet(zk_->Uri("/svc?chroot=/prod"));
  auto absolute = MakeSet(zk_->Uri("/prod/svc"));
  Recorder a(*chrooted), b(*absolute);
  ASSERT_TRUE(a.WaitFor(Eps({{"127.0.0.1", 1001}}))) << chrooted->Describe();
  ASSERT_TRUE(b.WaitFor(Eps({{"127.0.0.1", 1001}}))) << absolute->Describe();
  // Watches work below the chroot too.
  Kazoo(CreateMember("/prod/svc", "127.0.0.3", 1003));
  ASSERT_TRUE(a.WaitFor(Eps({{"127.0.0.1", 1001}, {"127.0.0.3", 1003}}))) << chrooted->Describe();
}

TEST_F(ZooKeeperTest, ServerSetCommandPrintsAndWatches) {
  Kazoo(CreateMember("/svc", "127.0.0.2", 1002) + "\n" + CreateMember("/svc", "127.0.0.1", 1001) +
        "\n" + CreateMember("/svc", "127.0.0.3", 1003, {}, "DEAD"));
  {
    test::ChildProcess tool({test::ToolPath(), "serverset", zk_->Uri("/svc")});
    EXPECT_EQ(tool.ReadLine(20s), "127.0.0.1:1001");
    EXPECT_EQ(tool.ReadLine(5s), "127.0.0.2:1002");
    EXPECT_EQ(tool.ReadLine(5s), std::nullopt);
    auto status = tool.WaitForExit(5s);
    ASSERT_TRUE(status);
    EXPECT_EQ(WEXITSTATUS(*status), 0);
  }
  // --watch, with a member announced by `scales testserver http --announce`.
  test::ChildProcess watch({test::ToolPath(), "serverset", zk_->Uri("/svc"), "--watch"});
  EXPECT_EQ(watch.ReadLine(20s), "+ 127.0.0.1:1001");
  EXPECT_EQ(watch.ReadLine(5s), "+ 127.0.0.2:1002");
  EXPECT_EQ(watch.ReadLine(5s), "# 2 members");
  auto server = std::make_unique<test::ChildProcess>(std::vector<std::string>{
      test::ToolPath(), "testserver", "http", "--announce", zk_->Uri("/svc")});
  auto listening = server->ReadLine(20s);
  ASSERT_TRUE(listening && listening->starts_with("listening 127.0.0.1:"));
  std::string endpoint = listening->substr(std::string("listening ").size());
  EXPECT_EQ(watch.ReadLine(20s), "+ " + endpoint);
  EXPECT_EQ(watch.ReadLine(5s), "# 3 members");
  server->Stop();  // SIGTERM: the announcer removes the member on the way out
  EXPECT_EQ(watch.ReadLine(20s), "- " + endpoint);
  EXPECT_EQ(watch.ReadLine(5s), "# 2 members");
}

// `scales serverset --watch` says that it waits for a path that does not exist, "and says so
// again if the path is deleted later". But a path's members go before it (ZooKeeper deletes
// only empty nodes): the list was empty already when the path went, no list was published, and
// the deletion went unsaid. A change of the path's existence is published (the same list).
TEST_F(ZooKeeperTest, ServerSetCommandSaysWhenThePathIsDeletedLater) {
  const std::string created = Kazoo(CreateMember("/later/svc", "127.0.0.1", 1001));
  const std::string err_path = ::testing::TempDir() + "serverset-deleted-later.txt";
  auto err = [&] {
    std::ifstream in(err_path);
    std::stringstream text;
    text << in.rdbuf();
    return text.str();
  };
  test::ChildProcess watch({test::ToolPath(), "serverset", zk_->Uri("/later/svc"), "--watch"}, err_path);
  EXPECT_EQ(watch.ReadLine(20s), "+ 127.0.0.1:1001");
  EXPECT_EQ(watch.ReadLine(5s), "# 1 members");
  Kazoo(fmt::format("zk.delete('{}')", created.substr(0, created.find('\n'))));
  EXPECT_EQ(watch.ReadLine(20s), "- 127.0.0.1:1001");
  EXPECT_EQ(watch.ReadLine(5s), "# 0 members");
  Kazoo("zk.delete('/later/svc')");
  EXPECT_TRUE(WaitFor([&] { return err().find("path /later/svc does not exist") != std::string::npos; }, 20s))
      << err();
  Kazoo(CreateMember("/later/svc", "127.0.0.2", 1002));
  EXPECT_EQ(watch.ReadLine(20s), "+ 127.0.0.2:1002");
  EXPECT_EQ(watch.ReadLine(5s), "# 1 members");
  std::remove(err_path.c_str());
}

// While libzookeeper cannot make a handle (here a host list it cannot parse), the connection
// retries every retry_interval. Each attempt used to leave a session record behind until
// Stop(): a slow leak for a misconfigured process.
TEST(ZooKeeperDownTest, AHandleThatCannotBeMadeIsRetriedWithoutKeepingRecords) {
  ZooKeeperOptions options;
  options.retry_interval = 5ms;
  options.max_retry_interval = 5ms;  // no backoff: every attempt 5 ms apart
  zk_internal::ZkConnection connection("127.0.0.1:", options);  // no port: no handle
  connection.Start({});
  ASSERT_TRUE(WaitFor([&] { return connection.StatusText().find("cannot create a ZooKeeper handle") != std::string::npos; }))
      << connection.StatusText();
  EXPECT_NE(connection.last_error().find("the host list is not valid"), std::string::npos) << connection.last_error();
  std::this_thread::sleep_for(300ms);  // some 60 attempts
  connection.Stop();
  EXPECT_EQ(connection.sessions_held(), 0u);
}

TEST(ZooKeeperDownTest, ServerSetCommandExplainsATimeout) {
  SKIP_WITHOUT_ZOOKEEPER();
  ZooKeeperServer zk(0, /*start=*/false);
  test::ChildProcess tool({test::ToolPath(), "serverset", zk.Uri("/svc"), "--timeout", "1s"});
  EXPECT_EQ(tool.ReadLine(10s), std::nullopt);
  auto status = tool.WaitForExit(10s);
  ASSERT_TRUE(status);
  EXPECT_EQ(WEXITSTATUS(*status), 1);
}

TEST(ZooKeeperEnsembleTest, StoppingOneServerDoesNotInterruptDiscovery) {
  SKIP_WITHOUT_ZOOKEEPER();
  ZooKeeperEnsemble ensemble;
  RunKazoo(ensemble.connect_string(), CreateMember("/svc", "127.0.0.1", 1001));
  auto set = MakeSet(ensemble.Uri("/svc"));
  Recorder rec(*set);
  ASSERT_TRUE(rec.WaitFor(Eps({{"127.0.0.1", 1001}}), 30s)) << set->Describe();
  for (int i = 0; i < 3; ++i) {
    ensemble.server(i).Stop();
    // Stopping the leader starts an election: the writer retries until the ensemble has a
    // quorum again (our server set must keep its members meanwhile, which is what's tested).
    // A retried create of the same endpoint is harmless: members collapse by host:port.
    auto write_deadline = std::chrono::steady_clock::now() + 60s;
    for (;;) {
      try {
        RunKazoo(ensemble.connect_string(), CreateMember("/svc", "127.0.0.1", 2000 + i));
        break;
      } catch (const std::exception& e) {
        ASSERT_LT(std::chrono::steady_clock::now(), write_deadline) << e.what();
      }
    }
    Members want = Eps({{"127.0.0.1", 1001}});
    for (int j = 0; j <= i; ++j) want.push_back({"127.0.0.1", static_cast<uint16_t>(2000 + j)});
    ASSERT_TRUE(rec.WaitFor(want, 30s)) << "server " << i << " stopped: " << Show(rec.last())
                                        << " " << set->Describe();
    // Never lost the members meanwhile.
    ensemble.server(i).Start();
  }
}

// The announcer's exists watch on its member fires once, for a data change as for a delete. A
// change (an operator, a tool rewriting the member's JSON) used the watch up without setting it
// again: the delete that followed went unseen and the server stayed out of the set for as long
// as the session lived.
TEST_F(ZooKeeperTest, AnnouncerAnnouncesAgainWhenItsMemberIsChangedThenDeleted) {
  ServiceInstance instance;
  instance.service_endpoint = {"127.0.0.1", 4243};
  Announcer announcer(ScalesUriParser::Parse(zk_->Uri("/changed/svc")), instance);
  ASSERT_TRUE(announcer.WaitAnnounced(20s)) << announcer.Describe();
  const std::string node = announcer.node_path();
  // Back to back: the watch set again after the change may find the member gone already.
  Kazoo(fmt::format("zk.set('{0}', {1})\nzk.delete('{0}')", node,
                    FinagleMemberPython("127.0.0.1", 4243, {}, "ALIVE")));
  EXPECT_TRUE(WaitFor(
      [&] {
        const std::string now = announcer.node_path();
        return !now.empty() && now != node;
      },
      10s))
      << announcer.Describe();
  EXPECT_EQ(Kazoo("print(len(zk.get_children('/changed/svc')))"), "1\n");
}

// A malformed member is skipped; the log says so, naming the node (it was only counted and put
// in last_error(), which the next problem overwrites: a silent drop for whoever reads the logs).
TEST_F(ZooKeeperTest, AMalformedMemberIsLoggedNamingTheNode) {
  test::LogCapture log;
  Kazoo(CreateMember("/bad/svc", "127.0.0.1", 1001) + "\n" +
        "zk.create('/bad/svc/member_broken', b'{not json')");
  ZooKeeperServerSet set(ScalesUriParser::Parse(zk_->Uri("/bad/svc")));
  ASSERT_TRUE(WaitFor([&] { return set.members() == Members{{"127.0.0.1", 1001}}; })) << set.Describe();
  EXPECT_TRUE(log.Has({"/bad/svc/member_broken", "malformed", "skipped"})) << log.All();
}

// An instance every reader would skip as malformed (no host, port 0: a server announced before
// its port was known) was announced all the same: the server got no traffic and nothing said why.
// The constructor refuses it, naming what is wrong, as it refuses bad options.
TEST_F(ZooKeeperTest, AnnouncerRefusesAnInstanceReadersWouldSkip) {
  const ParsedUri uri = ScalesUriParser::Parse(zk_->Uri("/refused/svc"));
  ServiceInstance no_port;
  no_port.service_endpoint = {"127.0.0.1", 0};
  ServiceInstance bad_http;
  bad_http.service_endpoint = {"127.0.0.1", 4244};
  bad_http.additional_endpoints["http"] = {"", 8080};
  for (const auto& [instance, what] : {std::pair{no_port, "serviceEndpoint.port"},
                                       std::pair{bad_http, "additionalEndpoints.http.host"}}) {
    try {
      Announcer announcer(uri, instance);
      ADD_FAILURE() << what << ": announced as " << announcer.node_path();
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), make_error_code(Errc::kInvalidArgument)) << e.what();
      EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find(zk_->Uri("/refused/svc")), std::string::npos) << e.what();
    }
  }
  EXPECT_EQ(Kazoo("print(zk.exists('/refused/svc') is None)"), "True\n");
}

// Member data over ZooKeeper's request limit (jute.maxbuffer, 1 MB by default; here a large
// metadata value) was sent all the same: the server closed the connection on each create, and
// the announcer reconnected and looked for, then created, its member again, in a loop, never
// announced, with nothing naming the cause. The constructor refuses it, naming the limit.
TEST_F(ZooKeeperTest, AnnouncerRefusesMemberDataOverZooKeepersRequestLimit) {
  const std::string uri = zk_->Uri("/big/svc");
  ServiceInstance big;
  big.service_endpoint = {"127.0.0.1", 4244};
  big.metadata["blob"] = std::string(size_t{2} << 20, 'x');
  try {
    Announcer announcer(ScalesUriParser::Parse(uri), big);
    announcer.WaitAnnounced(3s);
    ADD_FAILURE() << "not refused: " << announcer.Describe();
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), make_error_code(Errc::kInvalidArgument)) << e.what();
    EXPECT_NE(std::string(e.what()).find(uri), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("member data of 2097"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("jute.maxbuffer"), std::string::npos) << e.what();
  }
  // Just under the limit is announced (and read back by a server set).
  big.metadata["blob"] = std::string(1000000, 'x');
  Announcer announcer(ScalesUriParser::Parse(uri), big);
  ASSERT_TRUE(announcer.WaitAnnounced(20s)) << announcer.Describe();
  auto set = MakeSet(uri);
  ASSERT_TRUE(WaitFor([&] { return set->members() == Members{{"127.0.0.1", 4244}}; })) << set->Describe();
}

// ZooKeeperOptions::max_request_bytes follows the servers' jute.maxbuffer: against a server
// started with a raised limit, 2 MiB of member data is announced and read back; a limit set
// lower than the data refuses it at construction, naming the option.
TEST(ZooKeeperRequestLimitTest, AnnouncerFollowsMaxRequestBytes) {
  if (!test::ZooKeeperAvailable()) GTEST_SKIP() << "ZooKeeper is not installed";
  test::ZooKeeperServer zk(0, false);
  zk.AddJvmFlag("-Djute.maxbuffer=4194304");
  zk.Start();
  const std::string uri = zk.Uri("/raised/svc");
  ServiceInstance big;
  big.service_endpoint = {"127.0.0.1", 4245};
  big.metadata["blob"] = std::string(size_t{2} << 20, 'x');
  EXPECT_THROW(Announcer(ScalesUriParser::Parse(uri), big), Error);  // the default limit
  ZooKeeperOptions options;
  options.max_request_bytes = 4194304;
  Announcer announcer(ScalesUriParser::Parse(uri), big, options);
  ASSERT_TRUE(announcer.WaitAnnounced(20s)) << announcer.Describe();
  auto set = MakeSet(uri);
  ASSERT_TRUE(WaitFor([&] { return set->members() == Members{{"127.0.0.1", 4245}}; })) << set->Describe();

  ServiceInstance small;
  small.service_endpoint = {"127.0.0.1", 4246};
  small.metadata["blob"] = std::string(5000, 'y');
  options.max_request_bytes = ZooKeeperOptions::kMinMaxRequestBytes;
  try {
    Announcer refused(ScalesUriParser::Parse(uri), small, options);
    ADD_FAILURE() << "not refused: " << refused.Describe();
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), make_error_code(Errc::kInvalidArgument)) << e.what();
    EXPECT_NE(std::string(e.what()).find("(max_request_bytes 4096, the servers' jute.maxbuffer"), std::string::npos)
        << e.what();
  }
}

// Snapshots are delivered in order: on an executor whose threads take two deliveries at once,
// the older list could reach the listener last, and it stayed on that list until the next change.
TEST_F(ZooKeeperTest, AnOlderListIsNotDeliveredAfterANewerOne) {
  Kazoo(CreateMember("/order/svc", "127.0.0.1", 1001));
  ZooKeeperServerSet set(ScalesUriParser::Parse(zk_->Uri("/order/svc")));
  test::HandlerQueue queue;
  std::vector<Members> seen;
  set.Subscribe(queue.executor(), [&seen](const Members& m) { seen.push_back(m); });
  ASSERT_TRUE(WaitFor([&] { return queue.size() == 1; })) << set.Describe();
  Kazoo(CreateMember("/order/svc", "127.0.0.2", 1002));
  ASSERT_TRUE(WaitFor([&] { return queue.size() == 2; })) << set.Describe();
  auto run = queue.Take();
  run[1]();  // the newer list first
  run[0]();
  const Members both{{"127.0.0.1", 1001}, {"127.0.0.2", 1002}};
  ASSERT_FALSE(seen.empty());
  EXPECT_EQ(seen.back(), both) << "the subscriber must end on the set's list";
  EXPECT_EQ(seen.size(), 1u);
}

// ---------------------------------------------------------------------------------------------
// A zk:// client released inside one of its own handlers: its server set's shutdown (joining the
// discovery thread, closing the ZooKeeper session, which sends a close request and joins the C
// client's threads) must not run on the event loop, where every other client of that loop would
// wait for it (for seconds when the ensemble is slow or frozen).

// The java process of the test's ZooKeeperServer: this process's child named "java".
pid_t ZooKeeperPid() {
  for (const auto& entry : std::filesystem::directory_iterator("/proc")) {
    std::ifstream stat(entry.path() / "stat");
    std::string line;
    if (!std::getline(stat, line)) continue;
    const size_t close = line.rfind(')');
    const size_t open = line.find('(');
    if (open == std::string::npos || close == std::string::npos) continue;
    std::istringstream rest(line.substr(close + 2));
    char state = 0;
    pid_t ppid = 0;
    rest >> state >> ppid;
    if (ppid == ::getpid() && line.substr(open + 1, close - open - 1) == "java") {
      return static_cast<pid_t>(std::stol(entry.path().filename().string()));
    }
  }
  return 0;
}

// SIGSTOPs a process (a frozen ZooKeeper server: connections stay open, nothing is answered);
// SIGCONT when it goes.
class Frozen {
 public:
  explicit Frozen(pid_t pid) : pid_(pid) {
    if (pid_ > 0) ::kill(pid_, SIGSTOP);
  }
  ~Frozen() { Thaw(); }
  void Thaw() {
    if (pid_ > 0) ::kill(std::exchange(pid_, 0), SIGCONT);
  }

 private:
  pid_t pid_;
};

// Server sets released while the ensemble is frozen: each session's close waits 1.5 s for the
// ensemble's answer. The releases return at once (each took the 1.5 s) and the closes run side
// by side: six sets are closed in about the time of one (they took 9 s, one after the other).
TEST_F(ZooKeeperTest, ServerSetsReleasedWithAFrozenEnsembleCloseSideBySide) {
  constexpr size_t kSets = 6;
  static_assert(kSets <= zk_internal::ZkConnection::kMaxCloserThreads);
  Kazoo("zk.ensure_path('/frozen/svc')");
  ASSERT_TRUE(WaitFor([] { return zk_internal::ZkConnection::StopsPending() == 0; }, 30s));
  std::vector<std::unique_ptr<ZooKeeperServerSet>> sets;
  for (size_t i = 0; i < kSets; ++i) {
    sets.push_back(
        std::make_unique<ZooKeeperServerSet>(ScalesUriParser::Parse(zk_->Uri("/frozen/svc"))));
  }
  for (auto& set : sets) {
    ASSERT_TRUE(WaitFor([&] { return set->members().has_value(); })) << set->Describe();
  }
  const pid_t pid = ZooKeeperPid();
  ASSERT_GT(pid, 0) << "the ZooKeeper server's process was not found";
  Frozen frozen(pid);
  const auto released_at = std::chrono::steady_clock::now();
  sets.clear();
  const auto released = std::chrono::steady_clock::now() - released_at;
  EXPECT_EQ(zk_internal::ZkConnection::StopsPending(), kSets)
      << "the closes are not under way on the closer";
  ASSERT_TRUE(WaitFor([] { return zk_internal::ZkConnection::StopsPending() == 0; }, 60s));
  const auto closed = std::chrono::steady_clock::now() - released_at;
  frozen.Thaw();
  // The bounds leave room for a loaded machine (sanitizers, parallel tests).
  EXPECT_LT(released, 1s) << "releasing the server sets waited for their sessions' close";
  EXPECT_LT(closed, 5s) << "the sessions were closed one after the other";
  EXPECT_GT(closed, 1s) << "the ensemble was not frozen: the closes did not wait for it";
}

// Posts a probe to `loop` every millisecond and keeps the longest wait for one to run: how long
// the loop was kept from its other work.
class LoopStallMeter {
 public:
  explicit LoopStallMeter(EventLoop& loop) : loop_(loop), thread_([this] { Run(); }) {}
  ~LoopStallMeter() { Stop(); }
  void Stop() {
    stop_ = true;
    if (thread_.joinable()) thread_.join();
  }
  void Reset() { max_us_ = 0; }
  std::chrono::microseconds max() const { return std::chrono::microseconds(max_us_.load()); }

 private:
  void Run() {
    while (!stop_) {
      auto ran = std::make_shared<std::promise<void>>();
      auto future = ran->get_future();
      const auto posted = std::chrono::steady_clock::now();
      boost::asio::post(loop_.executor(), [ran] { ran->set_value(); });
      // Bounded: a runtime that went away drops the probe.
      if (future.wait_for(30s) != std::future_status::ready) return;
      const auto waited =
          std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now() - posted);
      int64_t prev = max_us_.load();
      while (waited.count() > prev && !max_us_.compare_exchange_weak(prev, waited.count())) {}
      std::this_thread::sleep_for(1ms);
    }
  }
  EventLoop& loop_;
  std::atomic<bool> stop_{false};
  std::atomic<int64_t> max_us_{0};
  std::thread thread_;
};

// A user's io_context run by a thread of the test's (the user's run()), for a runtime to wrap.
// Its destructor lets the io_context run out of work (the closed clients' shutdown) for up to
// 20 s, then stops it and joins the thread.
class UserIoContext {
 public:
  UserIoContext() : thread_([this] { ioc_.run(); }) {}
  ~UserIoContext() {
    work_.reset();
    WaitFor([&] { return ioc_.stopped(); }, 20s);
    ioc_.stop();
    thread_.join();
  }
  boost::asio::io_context& io_context() { return ioc_; }
  std::thread::id thread_id() const { return thread_.get_id(); }

 private:
  boost::asio::io_context ioc_;
  std::optional<boost::asio::executor_work_guard<boost::asio::io_context::executor_type>> work_{
      ioc_.get_executor()};
  std::thread thread_;
};

class ReleasedOnLoopTest : public ZooKeeperTest, public ::testing::WithParamInterface<bool> {
 protected:
  // A runtime with one loop, and a tcp:// client on it calling in a closed loop. `wrapped`: the
  // runtime wraps a user's io_context, run by a thread of the user's, on which
  // EventLoop::Current() is not set.
  void StartNeighbour(const TestHttpServer& server, bool wrapped = false) {
    if (wrapped) {
      user_ioc_ = std::make_unique<UserIoContext>();
      runtime_ = std::make_shared<Runtime>(user_ioc_->io_context());
    } else {
      RuntimeOptions r;
      r.threads = 1;
      runtime_ = std::make_shared<Runtime>(r);
    }
    load_.client = Http::NewClient("tcp://" + server.endpoint(), Options("tcp-neighbour"));
    load_.Start(2);
    ASSERT_TRUE(WaitFor([&] { return load_.completed > 20; }));
  }
  http::HttpOptions Options(const std::string& name) const {
    http::HttpOptions options;
    options.client.runtime = runtime_;
    options.client.name = name;
    options.client.timeout = 5s;
    options.client.open_timeout = 20s;
    return options;
  }
  // Freezes the ensemble if the test is the Frozen one, runs `release` (which posts, or makes
  // the loop run, what releases a ZooKeeper session on the loop), and checks the loop for a
  // second, while a frozen ensemble's close (1.5 s at least) is still under way, then thaws
  // the ensemble. Then every call of the neighbour completed, and so did the shutdown.
  void CheckTheLoopIsNotBlocked(const std::function<void()>& release) {
    const bool frozen = GetParam();
    std::optional<Frozen> freeze;
    if (frozen) {
      const pid_t pid = ZooKeeperPid();
      ASSERT_GT(pid, 0) << "the ZooKeeper server's process was not found";
      freeze.emplace(pid);
    }
    ASSERT_TRUE(WaitFor([] { return zk_internal::ZkConnection::StopsPending() == 0; }, 30s));
    LoopStallMeter meter(runtime_->loop(0));
    std::this_thread::sleep_for(50ms);
    meter.Reset();
    const int64_t calls_before = load_.completed;
    release();
    std::this_thread::sleep_for(1000ms);
    meter.Stop();  // waits for a probe the loop still holds up
    const auto stall = meter.max();
    const size_t pending = zk_internal::ZkConnection::StopsPending();
    const int64_t calls_meanwhile = load_.completed - calls_before;
    freeze.reset();
    // A close on the loop held it for 1.5 s with a frozen ensemble (for 3.5 s an announcer's
    // shutdown); the bound leaves room for a loaded machine (sanitizers, parallel tests).
    EXPECT_LT(stall, 1000ms) << "the loop was blocked while a ZooKeeper session shut down";
    EXPECT_GT(calls_meanwhile, 20) << "the neighbour's calls stalled";
    if (frozen) {
      EXPECT_EQ(pending, 1u) << "the frozen ensemble's close is not under way on the closer";
    }
    load_.StopAndWait();
    EXPECT_EQ(load_.failed.load(), 0) << load_.first_error;
    EXPECT_EQ(load_.started.load(), load_.completed.load()) << "every request completes exactly once";
    // The shutdown completes once the ensemble answers again.
    EXPECT_TRUE(WaitFor([] { return zk_internal::ZkConnection::StopsPending() == 0; }, 30s));
  }

  // Declared first: the io_context outlives the runtime and the clients that use it.
  std::unique_ptr<UserIoContext> user_ioc_;
  std::shared_ptr<Runtime> runtime_;
  Load load_;
};

// A zk:// client (its server set its own) and a tcp:// client on one runtime with one loop. The
// zk:// client's last handle goes inside its own handler, with the ensemble healthy (false) or
// frozen (true: SIGSTOP): the server set's close ran on the loop, which a frozen ensemble then
// held for 1.5 s, and every other client of the loop with it.
TEST_P(ReleasedOnLoopTest, AClientsServerSetIsClosedOffTheLoop) {
  TestHttpServer server("s0");
  Kazoo(CreateMember("/released/svc", "127.0.0.1", server.port()));
  ASSERT_NO_FATAL_FAILURE(StartNeighbour(server));
  auto zk_client = Http::NewClient(zk_->Uri("/released/svc"), Options("zk-released"));
  ASSERT_EQ(zk_client.Get("/name").Header("X-Server"), "s0");
  CheckTheLoopIsNotBlocked([&] {
    std::promise<void> released;
    auto done = released.get_future();
    zk_client.AsyncGet("/name", [client = zk_client, &released](error_code, http::Response) mutable {
      client = http::HttpClient();  // the last handle: the client goes here, on its loop
      released.set_value();
    });
    zk_client = http::HttpClient();
    ASSERT_EQ(done.wait_for(30s), std::future_status::ready);
  });
}

// An Announcer destroyed on the loop (a server's own handler, say) shuts down on the closer
// thread: its shutdown waits up to 2 s for the delete, then closes the session. The member is
// deleted all the same.
TEST_P(ReleasedOnLoopTest, AnAnnouncerDestroyedOnTheLoopShutsDownOffIt) {
  TestHttpServer server("s0");
  ASSERT_NO_FATAL_FAILURE(StartNeighbour(server));
  auto announcer = Announce(zk_->Uri("/announced/svc"), server);
  ASSERT_NE(announcer->node_path(), "");
  CheckTheLoopIsNotBlocked([&] {
    boost::asio::post(runtime_->loop(0).executor(), [a = std::move(announcer)]() mutable { a.reset(); });
  });
  EXPECT_EQ(Kazoo("print(len(zk.get_children('/announced/svc')))"), "0\n");
}

// The same on a runtime wrapping a user's io_context, the client released in its handler on the
// user's thread, where EventLoop::Current() is not set. (The close ran there, on the user's loop:
// a frozen ensemble held it for 1.5 s.)
TEST_P(ReleasedOnLoopTest, AClientsServerSetIsClosedOffAUsersIoContext) {
  TestHttpServer server("s0");
  Kazoo(CreateMember("/released/svc", "127.0.0.1", server.port()));
  ASSERT_NO_FATAL_FAILURE(StartNeighbour(server, /*wrapped=*/true));
  auto zk_client = Http::NewClient(zk_->Uri("/released/svc"), Options("zk-released"));
  ASSERT_EQ(zk_client.Get("/name").Header("X-Server"), "s0");
  CheckTheLoopIsNotBlocked([&] {
    std::promise<std::thread::id> released;
    auto done = released.get_future();
    zk_client.AsyncGet("/name", [client = zk_client, &released](error_code, http::Response) mutable {
      client = http::HttpClient();  // the last handle: the client goes here, on the user's thread
      released.set_value(std::this_thread::get_id());
    });
    zk_client = http::HttpClient();
    ASSERT_EQ(done.wait_for(30s), std::future_status::ready);
    EXPECT_EQ(done.get(), user_ioc_->thread_id()) << "the handler ran off the user's io_context";
  });
}

// An Announcer destroyed in a handler on a user's io_context that a runtime wraps. (Its
// shutdown ran there: 3.5 s with a frozen ensemble.)
TEST_P(ReleasedOnLoopTest, AnAnnouncerDestroyedOnAUsersIoContextShutsDownOffIt) {
  TestHttpServer server("s0");
  ASSERT_NO_FATAL_FAILURE(StartNeighbour(server, /*wrapped=*/true));
  auto announcer = Announce(zk_->Uri("/announced/svc"), server);
  ASSERT_NE(announcer->node_path(), "");
  CheckTheLoopIsNotBlocked([&] {
    boost::asio::post(runtime_->loop(0).executor(), [a = std::move(announcer)]() mutable { a.reset(); });
  });
  EXPECT_EQ(Kazoo("print(len(zk.get_children('/announced/svc')))"), "0\n");
}

INSTANTIATE_TEST_SUITE_P(ZooKeeper, ReleasedOnLoopTest, ::testing::Values(false, true),
                         [](const auto& info) { return info.param ? "Frozen" : "Healthy"; });

// A shutdown left to the closer thread still runs when the process exits right after it: at exit
// the closer runs what it holds and is joined. scales_zk_exit_helper (tests/helpers) announces a
// member, releases its Announcer on an event loop behind a stop that holds the closer until the
// exit has begun, and calls exit(). The member must be gone as soon as the process is; had the
// shutdown not run, it would stay until the ensemble expired the session (10 s).
TEST_F(ZooKeeperTest, AShutdownLeftToTheCloserRunsAtExit) {
  test::ChildProcess child({SCALES_ZK_EXIT_HELPER, "closer", zk_->Uri("/exiting/svc"), "4321"});
  const std::optional<std::string> announced = child.ReadLine(60s);
  ASSERT_TRUE(announced && announced->starts_with("announced /exiting/svc/member_"))
      << announced.value_or("(nothing)");
  const std::string node = announced->substr(std::strlen("announced "));
  // The stops holding every closer thread, and the announcer's behind them, were still with
  // the closer when exit() was called.
  EXPECT_EQ(
      child.ReadLine(60s).value_or("(nothing)"),
      fmt::format("exiting, {} stops pending", zk_internal::ZkConnection::kMaxCloserThreads + 1));
  const std::optional<int> status = child.WaitForExit(60s);
  const auto exited = std::chrono::steady_clock::now();
  ASSERT_TRUE(status.has_value()) << "the process did not exit";
  EXPECT_TRUE(WIFEXITED(*status) && WEXITSTATUS(*status) == 0) << "wait status " << *status;
  EXPECT_EQ(Kazoo(fmt::format("print(zk.exists('{}') is None)", node)), "True\n")
      << "the member outlived the process: its shutdown did not run at exit";
  ASSERT_LT(std::chrono::steady_clock::now() - exited, 8s)
      << "checked too late to tell a shutdown at exit from an expired session";
}

// An Announcer in a global, destroyed by exit() after the library's own statics, shuts down
// with the ensemble gone: its Shutdown() waits 2 s for a reconnect meanwhile, and the ZooKeeper
// C client logs each failed connect. (The log lines went through the routing list of
// zk_connection.cc, destroyed by then: the process crashed on the freed list.)
TEST_F(ZooKeeperTest, AnAnnouncerInAGlobalShutsDownAtExitWithTheEnsembleGone) {
  test::ChildProcess child({SCALES_ZK_EXIT_HELPER, "global", zk_->Uri("/exiting/svc"), "4321"});
  const std::optional<std::string> announced = child.ReadLine(60s);
  ASSERT_TRUE(announced && announced->starts_with("announced /exiting/svc/member_"))
      << announced.value_or("(nothing)");
  zk_->Stop();
  EXPECT_EQ(child.ReadLine(60s).value_or("(nothing)"), "ensemble gone, exiting");
  const std::optional<int> status = child.WaitForExit(60s);
  ASSERT_TRUE(status.has_value()) << "the process did not exit";
  EXPECT_TRUE(WIFEXITED(*status) && WEXITSTATUS(*status) == 0)
      << "wait status " << *status
      << (WIFSIGNALED(*status) ? fmt::format(" (signal {})", WTERMSIG(*status)) : "");
}

// ---------------------------------------------------------------------------------------------
// Discovery through connections that break at any byte (FaultProxy in front of the server): the
// server set and the announcer talk to ZooKeeper through three proxies that cut every connection
// after a few KiB either way (a FIN or a reset) or stall it there, and deliver bytes in pieces,
// while a writer of the test's own, straight to the server, adds and deletes members. The C client
// reconnects (its session survives, or expires and is replaced) and our watches and reads are
// retried; what the subscriber sees must stay consistent with what ZooKeeper held.

// A ZooKeeper handle of the test's own, straight to the server (C client, synchronous calls).
class DirectZk {
 public:
  explicit DirectZk(const std::string& hosts)
      : zh_(zookeeper_init2(hosts.c_str(), nullptr, 10000, nullptr, nullptr, 0,
                            [](const char*) {})) {
    EXPECT_NE(zh_, nullptr);
    EXPECT_TRUE(zh_ && WaitFor([&] { return zoo_state(zh_) == ZOO_CONNECTED_STATE; }, 10s));
  }
  ~DirectZk() {
    if (zh_ != nullptr) zookeeper_close(zh_);
  }
  DirectZk(const DirectZk&) = delete;
  DirectZk& operator=(const DirectZk&) = delete;

  // Creates a persistent sequential member of `path` (Finagle's format); returns its node's path.
  std::string CreateMember(const std::string& path, const Endpoint& endpoint) {
    const std::string data = fmt::format(
        R"({{"serviceEndpoint": {{"host": "{}", "port": {}}}, "additionalEndpoints": {{}}, "status": "ALIVE"}})",
        endpoint.host, endpoint.port);
    char created[512] = {};
    const int rc =
        zoo_create(zh_, (path + "/member_").c_str(), data.data(), static_cast<int>(data.size()),
                   &ZOO_OPEN_ACL_UNSAFE, ZOO_SEQUENCE, created, sizeof created);
    EXPECT_EQ(rc, ZOK) << zerror(rc);
    return created;
  }
  void Delete(const std::string& node) {
    const int rc = zoo_delete(zh_, node.c_str(), -1);
    EXPECT_EQ(rc, ZOK) << node << ": " << zerror(rc);
  }
  size_t Children(const std::string& path) {
    String_vector children{};
    const int rc = zoo_get_children(zh_, path.c_str(), 0, &children);
    EXPECT_EQ(rc, ZOK) << zerror(rc);
    const size_t n = rc == ZOK ? static_cast<size_t>(children.count) : 0;
    deallocate_String_vector(&children);
    return n;
  }

 private:
  zhandle_t* zh_;
};

TEST_F(ZooKeeperTest, MembersAreFollowedThroughFaultyConnections) {
  test::LogCapture log;
  const std::string path = "/faulty/svc";
  Kazoo(fmt::format("zk.ensure_path('{}')", path));
  DirectZk writer(zk_->connect_string());
  std::vector<std::unique_ptr<test::FaultProxy>> proxies;
  std::string hosts;
  for (uint64_t seed = 1; seed <= 3; ++seed) {
    proxies.push_back(std::make_unique<test::FaultProxy>(zk_->port(), seed));
    hosts += (hosts.empty() ? "" : ",") + proxies.back()->endpoint();
  }
  // 2 KiB is over what one reconnect carries (the handshake, and the watches set again for up to
  // 26 members: under 1 KiB), so most connections make some progress before their cut.
  test::FaultProxy::Faults faults;
  faults.cut = 1.0;
  faults.cut_within = 2048;
  faults.stall = 0.15;
  faults.split = 0.3;
  faults.pause = 200us;
  for (auto& proxy : proxies) proxy->SetFaults(faults);
  auto total = [&](int64_t (test::FaultProxy::*count)() const) {
    int64_t n = 0;
    for (auto& proxy : proxies) n += ((*proxy).*count)();
    return n;
  };

  // A 4 s session: a stalled connection is given up after 2/3 of it (the C client's receive
  // timeout), in time for the session to survive the reconnect most of the time.
  const std::string uri = fmt::format("zk://{}{}?session_timeout=4s", hosts, path);
  auto set = MakeSet(uri);
  Recorder rec(*set);
  const Endpoint announced{"127.0.0.9", 9009};
  ServiceInstance instance;
  instance.service_endpoint = announced;
  Announcer announcer(ScalesUriParser::Parse(uri), instance);

  // The writer walks the member list between 3 and 25 members, one change every 20 ms; each
  // member it creates has an endpoint of its own, never used again.
  std::mt19937_64 random(7);
  std::map<uint16_t, std::string> live;  // port -> node
  std::set<Endpoint> created;
  uint16_t next_port = 2000;
  int steps = 0;
  const auto started = std::chrono::steady_clock::now();
  while (
      std::chrono::steady_clock::now() - started < 40s &&
      (steps < 60 || total(&test::FaultProxy::cuts) < 30 || total(&test::FaultProxy::stalls) < 3)) {
    const bool add = live.size() < 3 || (live.size() < 25 && random() % 2 == 0);
    if (add) {
      const Endpoint endpoint{"127.0.0.1", next_port++};
      live[endpoint.port] = writer.CreateMember(path, endpoint);
      created.insert(endpoint);
    } else {
      auto victim = std::next(live.begin(), static_cast<long>(random() % live.size()));
      writer.Delete(victim->second);
      live.erase(victim);
    }
    // Bursts of changes 20 ms apart, then a quiet moment in which the set can catch up (it
    // publishes a list once every read it started is answered).
    std::this_thread::sleep_for(++steps % 4 == 0 ? 150ms : 20ms);
  }
  const int64_t cuts = total(&test::FaultProxy::cuts), stalls = total(&test::FaultProxy::stalls);
  EXPECT_GE(cuts, 30) << "the faults did not come: " << steps << " steps";
  EXPECT_GE(stalls, 3);

  // Once the faults stop, the subscriber ends on what ZooKeeper holds.
  for (auto& proxy : proxies) proxy->Calm();
  std::set<Endpoint> want{announced};
  for (const auto& [port, node] : live) want.insert(Endpoint{"127.0.0.1", port});
  const auto last_as_set = [&] {
    const auto last = rec.last();
    return last ? std::set<Endpoint>(last->begin(), last->end()) : std::set<Endpoint>{};
  };
  ASSERT_TRUE(WaitFor([&] { return last_as_set() == want; }, 30s))
      << "ZooKeeper holds " << want.size() << " members, the set " << Show(rec.last()) << "\n"
      << set->Describe() << "\n"
      << announcer.Describe() << "\n"
      << log.All();
  EXPECT_EQ(writer.Children(path), live.size() + 1) << "the announcer's member is there once";
  EXPECT_GE(set->stats().connection_losses, 5u) << set->Describe();

  // Every list delivered was one ZooKeeper could have held: no endpoint it never had, none
  // twice, and each of the writer's members seen over one stretch of lists (it exists once,
  // from its create to its delete, so a list without it between two with it went back in time).
  // The announcer's member is left out of the last check: a session lost to the faults (over
  // 4 s without a connection that carried a ping) takes it away until it is announced again.
  const std::vector<Members> lists = rec.all();
  std::map<Endpoint, std::pair<size_t, size_t>> seen;  // first and last list holding it
  for (size_t i = 0; i < lists.size(); ++i) {
    const std::set<Endpoint> list(lists[i].begin(), lists[i].end());
    EXPECT_EQ(list.size(), lists[i].size())
        << "list " << i << " holds an endpoint twice: " << Show(lists[i]);
    for (const Endpoint& e : list) {
      EXPECT_TRUE(e == announced || created.contains(e))
          << "list " << i << " holds " << e.ToString();
      auto [it, first] = seen.try_emplace(e, i, i);
      it->second.second = i;
    }
  }
  for (const auto& [endpoint, stretch] : seen) {
    if (endpoint == announced) continue;
    for (size_t i = stretch.first; i <= stretch.second; ++i) {
      EXPECT_NE(std::find(lists[i].begin(), lists[i].end(), endpoint), lists[i].end())
          << endpoint.ToString() << " is in lists " << stretch.first << " and " << stretch.second
          << " but not in list " << i;
    }
  }
  std::cerr << "[ info ] " << steps << " changes, " << lists.size() << " lists, " << cuts
            << " cuts, " << stalls << " stalls, " << set->stats().connection_losses
            << " connection losses, " << set->stats().sessions << " sessions\n";
}

}  // namespace
}  // namespace scales
