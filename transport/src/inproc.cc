// The in-process transport: a registry of this process's in-process transports by address; Send
// queues the message at the receiver, whose WaitFor places and copies it (memcpy into the segments)
// on its own thread, then tells the sender.
#include <poll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <set>

#include "transport/transport.h"

namespace kvm::transport {
namespace {

class InProcess;

std::mutex g_mu;
std::map<uint64_t, InProcess*> g_registry;  // address → live transport
uint64_t g_next = 1;

class InProcess : public Transport {
 public:
  InProcess() : efd_(eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)) {
    std::lock_guard<std::mutex> l(g_mu);
    id_ = g_next++;
    g_registry[id_] = this;
  }
  ~InProcess() override {
    {
      std::lock_guard<std::mutex> l(g_mu);
      g_registry.erase(id_);
    }
    std::lock_guard<std::mutex> l(mu_);
    for (auto& m : inbox_) m.done(Status::Cancelled("receiver closed"));
    if (efd_ >= 0) ::close(efd_);
  }
  const char* name() const override { return "inproc"; }
  std::vector<uint8_t> address() const override {
    std::vector<uint8_t> a(sizeof(id_));
    std::memcpy(a.data(), &id_, sizeof(id_));
    return a;
  }
  size_t max_header_bytes() const override { return 8192; }
  Status Register(void*, size_t) override { return Status::Ok(); }

  Result<uint64_t> Connect(std::span<const uint8_t> address) override {
    if (address.size() != sizeof(uint64_t))
      return Status::InvalidArgument("in-process address of " + std::to_string(address.size()) +
                                     " bytes");
    uint64_t id;
    std::memcpy(&id, address.data(), sizeof(id));
    {
      std::lock_guard<std::mutex> l(g_mu);
      if (!g_registry.count(id))
        return Status::Unavailable("no in-process transport " + std::to_string(id));
    }
    std::lock_guard<std::mutex> l(mu_);
    peers_.insert(id);
    return id;  // the peer id is the receiver's address
  }
  void Disconnect(uint64_t peer) override {
    std::lock_guard<std::mutex> l(mu_);
    peers_.erase(peer);
  }
  Status Send(uint64_t peer, std::span<const uint8_t> header, std::span<const uint8_t> data,
              SendDone done) override {
    if (header.size() > max_header_bytes())
      return Status::InvalidArgument("header of " + std::to_string(header.size()) + " bytes");
    {
      std::lock_guard<std::mutex> l(mu_);
      if (!peers_.count(peer)) return Status::Unavailable("in-process peer not connected");
    }
    std::lock_guard<std::mutex> l(g_mu);  // the receiver cannot go away while we queue
    auto it = g_registry.find(peer);
    if (it == g_registry.end()) return Status::Unavailable("in-process peer is gone");
    InProcess* r = it->second;
    {
      std::lock_guard<std::mutex> rl(r->mu_);
      r->inbox_.push_back({{header.begin(), header.end()}, data, std::move(done)});
    }
    const uint64_t one = 1;
    (void)!::write(r->efd_, &one, sizeof(one));  // wakes the receiver's WaitFor
    return Status::Ok();
  }
  Status SendGather(uint64_t peer, std::span<const uint8_t> header,
                    std::span<const Segment> segments, SendDone done) override {
    // The receiver copies from one buffer: gather here (what a copy would do anyway).
    auto buf = std::make_shared<std::vector<uint8_t>>();
    for (const Segment& s : segments) {
      const auto* p = static_cast<const uint8_t*>(s.ptr);
      buf->insert(buf->end(), p, p + s.len);
    }
    return Send(peer, header, *buf, [buf, done = std::move(done)](const Status& s) { done(s); });
  }
  bool GatherPays(uint64_t) const override { return false; }
  std::string Describe(uint64_t) const override { return "inproc (memcpy)"; }

  void SetReceiver(Placement place, Delivered delivered) override {
    std::lock_guard<std::mutex> l(mu_);
    place_ = std::move(place);
    delivered_ = std::move(delivered);
  }
  // Event-driven: senders write the eventfd; WaitFor polls it (and wake_fd).
  Status WaitFor(const std::function<bool()>& done, int timeout_ms, int wake_fd) override {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
    for (;;) {
      uint64_t n;
      while (::read(efd_, &n, sizeof(n)) == sizeof(n)) {
      }
      std::deque<Message> batch;
      {
        std::lock_guard<std::mutex> l(mu_);
        batch.swap(inbox_);
      }
      for (auto& m : batch) Deliver(m);
      if (done()) return Status::Ok();
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
                            deadline - std::chrono::steady_clock::now())
                            .count();
      if (left <= 0) return Status::TimedOut("data plane: nothing arrived in time");
      pollfd p[2] = {{efd_, POLLIN, 0}, {wake_fd, POLLIN, 0}};
      const int r = ::poll(p, wake_fd >= 0 ? 2 : 1, int(std::min<int64_t>(left, 1000)));
      if (r > 0 && wake_fd >= 0 && (p[1].revents & (POLLIN | POLLHUP | POLLERR)))
        return Status::Ok();
    }
  }

 private:
  struct Message {
    std::vector<uint8_t> header;
    std::span<const uint8_t> data;
    SendDone done;
  };
  void Deliver(Message& m) {
    Status st;
    if (!place_) {
      st = Status::FailedPrecondition("no receiver set");
    } else {
      auto segs = place_(m.header, m.data.size());
      if (!segs.ok()) {
        st = segs.status();
      } else {
        size_t off = 0;
        for (const Segment& s : *segs) {
          if (off + s.len > m.data.size()) {
            st = Status::InvalidArgument("placement exceeds the data");
            break;
          }
          if (s.len) std::memcpy(s.ptr, m.data.data() + off, s.len);  // no blocks: data() null
          off += s.len;
        }
        if (st.ok() && off != m.data.size())
          st = Status::InvalidArgument("placement does not cover the data");
      }
    }
    if (delivered_) delivered_(m.header, st);
    m.done(Status::Ok());
  }
  uint64_t id_ = 0;
  int efd_ = -1;
  std::mutex mu_;
  std::deque<Message> inbox_;
  std::set<uint64_t> peers_;  // connected (sending side)
  Placement place_;
  Delivered delivered_;
};

}  // namespace

std::unique_ptr<Transport> MakeInProcess() { return std::make_unique<InProcess>(); }

}  // namespace kvm::transport
