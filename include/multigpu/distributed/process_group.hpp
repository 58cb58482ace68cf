#pragma once
/// @file
/// Training over several processes and machines on LibTorch's own
/// distributed machinery: a c10d TCPStore for the rendezvous, c10d's
/// ProcessGroupGloo between processes on CPUs, and one NCCL communicator over
/// every GPU of every process (unique id passed through the store) on GPUs.
///
///   auto group = multigpu::ProcessGroup::from_environment();  // torchrun, srun, mpirun, or none
///   multigpu::DataParallel<Net> dp(net, devices, group->data_parallel_options());
///
/// Inside each process DataParallel drives that process's devices as usual;
/// its gradient all-reduce, and the broadcast of parameters and buffers from
/// global rank 0, reach every process. Without launcher variables the group
/// is a single process and changes nothing, so one program serves both.
///
/// Not part of multigpu.hpp: c10d's and Gloo's headers are heavy, and only
/// multi-process programs pay for them. Needs MULTIGPU_WITH_DISTRIBUTED (set
/// by CMake when LibTorch has c10d with Gloo and Gloo's headers are found);
/// without it a single process still works and more are a clear error.
///
/// Time-outs: the rendezvous, every collective and the wait for a peer fail
/// with a DistributedError after DistributedOptions::timeout; what cannot
/// succeed fails at once (see Note [Rendezvous failures]). The error names
/// the ranks that stopped answering: every process adds to a heartbeat
/// counter in the store once a second, and after a failure the counters that
/// no longer move show who is gone. A failed collective leaves the group
/// broken (later collectives throw at once): the processes no longer agree
/// on what was reduced.

#include "multigpu/config.hpp"

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <ATen/ATen.h>
#include <fcntl.h>
#include <fmt/core.h>
#include <netdb.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include "multigpu/backend.hpp"
#include "multigpu/comm.hpp"
#include "multigpu/data_parallel.hpp"
#include "multigpu/detail/compat.hpp"
#include "multigpu/distributed_env.hpp"
#include "multigpu/error.hpp"
#include "multigpu/worker.hpp"

#if MULTIGPU_WITH_DISTRIBUTED
#ifndef USE_C10D_GLOO
#define USE_C10D_GLOO 1  // c10d's header shows ProcessGroupGloo only with it; the library has it
#endif
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#endif

#if MULTIGPU_WITH_NCCL
#include "multigpu/nccl/communicator.hpp"
#endif

namespace multigpu {

/// This process's membership of a multi-process job (see the file comment).
/// Create one per process, before any DataParallel that uses it, and keep it
/// alive as long as they are.
class ProcessGroup : public std::enable_shared_from_this<ProcessGroup> {
 public:
  /// Reads the environment (explicit `options` override it) and, with more
  /// than one process, meets the others: rank 0 serves the store at
  /// MASTER_ADDR:MASTER_PORT, every rank checks in and waits for all the
  /// others, then the Gloo group connects. Throws DistributedError naming
  /// the variable, the address or the ranks missing.
  static std::shared_ptr<ProcessGroup> from_environment(const DistributedOptions& options = {},
                                                        const EnvLookup& lookup = process_environment()) {
    return std::shared_ptr<ProcessGroup>(new ProcessGroup(read_distributed_env(options, lookup), options.timeout));
  }
  /// The same from an already read environment.
  static std::shared_ptr<ProcessGroup> create(const DistributedEnv& env,
                                              std::chrono::milliseconds timeout = std::chrono::minutes(5)) {
    return std::shared_ptr<ProcessGroup>(new ProcessGroup(env, timeout));
  }
  inline ~ProcessGroup();
  ProcessGroup(const ProcessGroup&) = delete;
  ProcessGroup& operator=(const ProcessGroup&) = delete;

  const DistributedEnv& env() const { return env_; }
  int rank() const { return env_.rank; }
  int size() const { return env_.world_size; }
  bool is_primary() const { return env_.rank == 0; }
  bool distributed() const { return env_.distributed(); }
  std::chrono::milliseconds timeout() const { return timeout_; }

  /// `base` with the communicator that reaches every process (unchanged for
  /// a single process). What it makes keeps the group alive.
  inline DataParallelOptions data_parallel_options(DataParallelOptions base = {});
  /// The communicator over `replicas` (this process's) and every other
  /// process's: NCCL over all GPUs when every replica is on a distinct GPU
  /// and NCCL is compiled in, else local reduction plus Gloo. Collective:
  /// every process calls it, in the same order.
  inline std::unique_ptr<Communicator> make_communicator(const std::vector<ReplicaContext>& replicas);

  /// The device spec this process should use: with one process per device
  /// (LOCAL_WORLD_SIZE > 1) "auto" becomes this process's GPU, LOCAL_RANK;
  /// anything else is returned as it is.
  std::string local_device_spec(const std::string& spec) const {
    if (env_.local_world_size > 1 && (spec == "auto" || spec == "cuda")) return std::to_string(env_.local_rank);
    return spec;
  }

  /// In place on a CPU tensor of every process: the sum over processes.
  inline void all_reduce_sum(const at::Tensor& tensor);
  /// In place on a CPU tensor of every process: a copy of `root`'s.
  inline void broadcast(const at::Tensor& tensor, int root);
  /// Returns when every process has called it.
  inline void barrier();
  /// Every process's `value`, by rank (through the store; for small facts).
  inline std::vector<std::string> all_gather_text(const std::string& value);

 private:
  inline ProcessGroup(DistributedEnv env, std::chrono::milliseconds timeout);
  inline void connect();
  /// Checks in at the store and waits for the others (see Note [Rendezvous failures]).
  inline void meet(const std::string& where);
  inline void start_heartbeat();
  inline void stop_heartbeat() noexcept;
  /// Runs a collective under the group's lock, turning failures and
  /// time-outs into a DistributedError that names the silent ranks.
  template <class Fn>
  void collective(const char* what, Fn&& fn);
  inline std::string diagnose_peers();
  inline void check_usable(const char* what) const;
  std::chrono::milliseconds heartbeat_interval() const {
    return std::clamp(timeout_ / 4, std::chrono::milliseconds(50), std::chrono::milliseconds(1000));
  }
  std::string heartbeat_key(int rank) const { return fmt::format("multigpu/heartbeat/{}", rank); }

  DistributedEnv env_;
  std::chrono::milliseconds timeout_;
  std::string broken_;
  std::mutex mutex_;       // one collective at a time: Gloo matches calls by order
  std::int64_t rounds_ = 0;  // all_gather_text calls so far (same on every process)
  std::vector<std::string> peers_;  // "host (pid N)" by rank
#if MULTIGPU_WITH_DISTRIBUTED
  c10::intrusive_ptr<c10d::TCPStore> store_;
  c10::intrusive_ptr<c10d::TCPStore> heartbeat_store_;  // its own connection, so beats never wait for a collective
  c10::intrusive_ptr<c10d::ProcessGroupGloo> gloo_;
#endif
  std::thread heartbeat_;
  std::mutex heartbeat_mutex_;
  std::condition_variable heartbeat_cv_;
  bool heartbeat_stop_ = false;
};

/// The communicator of a multi-process job on CPUs (or GPUs without NCCL):
/// reduces this process's replicas locally, all-reduces that sum across
/// processes with Gloo (staged through host memory), and copies the result
/// to every local replica. Broadcasts come from global rank 0.
class CrossProcessCommunicator : public Communicator {
 public:
  /// Collective: every process builds one, in the same order.
  inline CrossProcessCommunicator(std::vector<ReplicaContext> replicas, std::shared_ptr<ProcessGroup> group);

  std::string name() const override { return "local+gloo"; }
  std::size_t size() const override { return local_.size(); }
  std::size_t world_size() const override { return world_replicas_; }
  inline void all_reduce(const std::vector<at::Tensor>& tensors, ReduceOp op) override;
  inline void broadcast(const std::vector<at::Tensor>& tensors, std::size_t root) override;

 private:
  /// Runs `fn` on a contiguous host copy of replica r's `tensor` (the tensor
  /// itself when it is one already) and copies the result back.
  template <class Fn>
  void on_host(const at::Tensor& tensor, std::size_t r, Fn&& fn);

  std::vector<ReplicaContext> replicas_;
  LocalCommunicator local_;
  std::shared_ptr<ProcessGroup> group_;
  std::size_t world_replicas_ = 0;
};

// ---------------------------------------------------------------------------
// Definitions

namespace detail {

inline std::string this_host() {
  char name[256] = {};
  if (gethostname(name, sizeof(name) - 1) != 0) return "unknown host";
  return name;
}

/// The first line of an error (c10 errors carry a backtrace after it).
inline std::string first_line(const std::string& text) { return text.substr(0, text.find('\n')); }

/// The first line of the exception being handled, whatever its type: every
/// failure of c10d reaches the user as a DistributedError (c10d throws
/// c10::Error, std::system_error and std::runtime_error, depending on the
/// call and the LibTorch version).
inline std::string current_error() {
  try {
    throw;
  } catch (const std::exception& e) {
    return first_line(e.what());
  } catch (...) {
    return "an exception of unknown type";
  }
}

inline bool is_loopback(const std::string& addr) {
  return addr == "localhost" || addr.rfind("127.", 0) == 0 || addr == "::1";
}

// Note [Rendezvous failures]
// A rendezvous that cannot succeed fails at once, on every rank it concerns;
// only a process that is really missing costs the time-out:
// - MASTER_ADDR is resolved (getaddrinfo) before anything else: a name that
//   does not resolve would otherwise look like an unreachable rank 0.
// - Before c10d's client connects, a rank other than 0 connects once itself
//   and listens briefly. A c10d store never speaks first nor closes an idle
//   connection, so a listener that does is another program on MASTER_PORT.
//   c10d would retry it until the time-out (LibTorch 2.x) or accept it, fail
//   on the first operation with a std::system_error and end the process from
//   its own thread (1.13).
// - A listener that accepts and then stays silent is no better: c10d's
//   client waits for its first answer without any time-out. The store is
//   therefore constructed on a thread of its own that the rank waits for at
//   most the time-out (and some grace, since c10d's own retries overrun it);
//   past that the thread is left to end when the peer does.
// - Processes started with different world sizes: the first rank to arrive
//   states its world size in the store (compare-and-set); every rank compares
//   with it before it checks in, and the one that disagrees leaves the
//   reason in the store. The others poll for it while they wait for the
//   missing ranks, so every rank is told at once what each one said. Rank 0,
//   which serves the store, leaves only after every rank that came has read it.
// - Every store operation, in the rendezvous, the heartbeat thread and the
//   destructor, catches whatever c10d throws: an exception escaping a thread
//   or a destructor would end the process.

/// getaddrinfo's answer, freed with it.
using AddressList = std::unique_ptr<addrinfo, decltype(&::freeaddrinfo)>;

/// The stream addresses of `env`'s MASTER_ADDR:MASTER_PORT; a DistributedError
/// naming the variable and its value when the name does not resolve.
inline AddressList resolve_master(const DistributedEnv& env) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* found = nullptr;
  const int status = ::getaddrinfo(env.master_addr.c_str(), std::to_string(env.master_port).c_str(), &hints, &found);
  if (status != 0) {
    throw DistributedError(fmt::format(
        "rank {}: {}='{}' is not a host name this machine can resolve ({}); set it to the host name or IP address of "
        "rank 0's machine, the same for every process",
        env.rank, env.master_addr_source, env.master_addr,
        status == EAI_SYSTEM ? std::strerror(errno) : ::gai_strerror(status)));
  }
  return AddressList(found, &::freeaddrinfo);
}

/// What a first connection to rank 0's address found.
struct ListenerProbe {
  bool connected = false;  ///< something accepted the connection
  std::string foreign;     ///< how it showed that it is not a c10d store ("" when it stayed silent, as a store does)
};

/// Connects to the first of `addresses` that answers within `connect_limit`
/// and watches the connection for `watch` (see Note [Rendezvous failures]).
/// Nothing listening yet is no error here: rank 0 may still be starting.
inline ListenerProbe probe_listener(const addrinfo* addresses, std::chrono::milliseconds connect_limit,
                                    std::chrono::milliseconds watch) {
  ListenerProbe probe;
  for (const addrinfo* address = addresses; address != nullptr && !probe.connected; address = address->ai_next) {
    const int fd = ::socket(address->ai_family, address->ai_socktype, address->ai_protocol);
    if (fd < 0) continue;
    ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) | O_NONBLOCK);
    if (::connect(fd, address->ai_addr, address->ai_addrlen) == 0) {
      probe.connected = true;
    } else if (errno == EINPROGRESS) {
      pollfd writable{fd, POLLOUT, 0};
      int error = 0;
      socklen_t length = sizeof(error);
      probe.connected = ::poll(&writable, 1, static_cast<int>(connect_limit.count())) == 1 &&
                        ::getsockopt(fd, SOL_SOCKET, SO_ERROR, &error, &length) == 0 && error == 0;
    }
    pollfd readable{fd, POLLIN, 0};
    if (probe.connected && ::poll(&readable, 1, static_cast<int>(watch.count())) == 1) {
      char bytes[48] = {};
      const ssize_t received = ::recv(fd, bytes, sizeof(bytes), 0);
      if (received > 0) {
        std::string text(bytes, static_cast<std::size_t>(received));
        for (char& c : text) c = c >= 0x20 && c < 0x7f ? c : '.';
        probe.foreign = fmt::format("it spoke first (\"{}\"), which a store never does", text);
      } else if (received == 0) {
        probe.foreign = "it accepted the connection and closed it at once";
      } else {
        probe.foreign = fmt::format("it reset the connection ({})", std::strerror(errno));
      }
    }
    ::close(fd);
  }
  return probe;
}

}  // namespace detail

inline ProcessGroup::ProcessGroup(DistributedEnv env, std::chrono::milliseconds timeout)
    : env_(std::move(env)), timeout_(timeout) {
  if (timeout_.count() <= 0) throw DistributedError("DistributedOptions::timeout must be positive");
  peers_.assign(static_cast<std::size_t>(env_.world_size), "");
  if (!env_.distributed()) return;
#if MULTIGPU_WITH_DISTRIBUTED
  connect();
#else
  throw DistributedError(fmt::format(
      "{}, but this build of multigpu has no multi-process support: it needs LibTorch's c10d with Gloo and Gloo's "
      "headers (Debian: libgloo-dev) when CMake configures the project",
      env_.describe()));
#endif
}

inline ProcessGroup::~ProcessGroup() {
  stop_heartbeat();
#if MULTIGPU_WITH_DISTRIBUTED
  if (!store_) return;
  // Rank 0 serves the store: it stays until every rank has said goodbye (or
  // a short while, when the job already failed), so that no rank loses the
  // store while it still talks to it.
  try {
    store_->add("multigpu/finished", 1);
    if (is_primary()) {
      const auto limit = broken_.empty() ? std::min(timeout_, std::chrono::milliseconds(30000))
                                         : std::chrono::milliseconds(1000);
      const auto deadline = std::chrono::steady_clock::now() + limit;
      while (store_->add("multigpu/finished", 0) < env_.world_size && std::chrono::steady_clock::now() < deadline) {
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
      }
    }
  } catch (...) {
    // The store is gone (rank 0 ended first): nothing left to say goodbye to.
  }
  gloo_.reset();
  heartbeat_store_.reset();
  store_.reset();
#endif
}

#if MULTIGPU_WITH_DISTRIBUTED

namespace detail {

/// A TCPStore constructed (and, for a client, asked once) on a thread of its own, waited for at most
/// `limit`: null past it, the thread left to end on its own (see Note
/// [Rendezvous failures]). What the constructor throws is rethrown here.
inline c10::intrusive_ptr<c10d::TCPStore> open_store_within(const std::string& host,
                                                            const c10d::TCPStoreOptions& options,
                                                            std::chrono::milliseconds limit) {
  struct Attempt {
    std::mutex mutex;
    std::condition_variable done_cv;
    bool done = false;
    c10::intrusive_ptr<c10d::TCPStore> store;
    std::exception_ptr error;
  };
  auto attempt = std::make_shared<Attempt>();
  std::thread opener([attempt, host, options] {
    c10::intrusive_ptr<c10d::TCPStore> store;
    std::exception_ptr error;
    try {
      store = c10::make_intrusive<c10d::TCPStore>(host, options);
      // One round trip, within the limit too: LibTorch 1.13's constructor
      // does not speak to the server, so a peer that accepts and never
      // answers would block the first store call instead, with no time-out.
      if (!options.isServer) store->check({"multigpu/hello"});
    } catch (...) {
      error = std::current_exception();
    }
    std::lock_guard<std::mutex> lock(attempt->mutex);
    attempt->store = std::move(store);
    attempt->error = error;
    attempt->done = true;
    attempt->done_cv.notify_all();
  });
  std::unique_lock<std::mutex> lock(attempt->mutex);
  if (!attempt->done_cv.wait_for(lock, limit, [&] { return attempt->done; })) {
    opener.detach();
    return {};
  }
  lock.unlock();
  opener.join();
  if (attempt->error) std::rethrow_exception(attempt->error);
  return std::move(attempt->store);
}

}  // namespace detail

inline void ProcessGroup::connect() {
  // See Note [Rendezvous failures].
  const std::string where = fmt::format("{}:{}", env_.master_addr, env_.master_port);
  const detail::AddressList addresses = detail::resolve_master(env_);
  detail::ListenerProbe probe;
  if (!is_primary()) {
    probe = detail::probe_listener(addresses.get(), std::min(timeout_, std::chrono::milliseconds(2000)),
                                   std::chrono::milliseconds(200));
    if (!probe.foreign.empty()) {
      throw DistributedError(fmt::format(
          "rank {}: what listens at {} (MASTER_ADDR:MASTER_PORT) is not rank 0's rendezvous store: {}. Another "
          "program uses port {} on {}: start every process with the same free MASTER_PORT",
          env_.rank, where, probe.foreign, env_.master_port, env_.master_addr));
    }
  }

  c10d::TCPStoreOptions options;
  options.port = static_cast<std::uint16_t>(env_.master_port);
  options.isServer = is_primary();
  options.numWorkers = static_cast<std::size_t>(env_.world_size);
  options.waitWorkers = false;  // we wait ourselves, to name who is missing
  options.timeout = timeout_;
  // c10d's own retries overrun its time-out by a few seconds.
  const auto limit = timeout_ + std::max(timeout_ / 4, std::min(timeout_, std::chrono::milliseconds(5000)));
  const auto unreachable = [&](const std::string& cause) {
    if (is_primary()) {
      return DistributedError(fmt::format(
          "rank 0 could not serve the rendezvous store on port {} (MASTER_PORT){}: {}. Choose a free MASTER_PORT",
          env_.master_port,
          cause.find("in use") != std::string::npos || cause.find("EADDRINUSE") != std::string::npos
              ? " because the port is in use"
              : "",
          cause));
    }
    return DistributedError(fmt::format("rank {} could not reach the rendezvous store of rank 0 at {} (MASTER_ADDR:"
                                        "MASTER_PORT) within {} ms: {}. Is rank 0 running, and are MASTER_ADDR and "
                                        "MASTER_PORT the same for every process?",
                                        env_.rank, where, timeout_.count(), cause));
  };
  try {
    store_ = detail::open_store_within(env_.master_addr, options, limit);
    options.isServer = false;
    if (store_) heartbeat_store_ = detail::open_store_within(env_.master_addr, options, limit);
  } catch (...) {
    throw unreachable(detail::current_error());
  }
  if (!heartbeat_store_ && probe.connected) {
    throw DistributedError(fmt::format("rank {}: what listens at {} (MASTER_ADDR:MASTER_PORT) accepted the connection "
                                       "but did not answer as rank 0's rendezvous store within {} ms. Is another "
                                       "program using port {} on {}? Start every process with the same free "
                                       "MASTER_PORT",
                                       env_.rank, where, limit.count(), env_.master_port, env_.master_addr));
  }
  if (!heartbeat_store_) throw unreachable("no answer");

  try {
    meet(where);
  } catch (const DistributedError&) {
    throw;
  } catch (...) {
    throw DistributedError(fmt::format("rank {}: the rendezvous store at {} stopped answering during the rendezvous "
                                       "({}): did rank 0 end? Its output says why",
                                       env_.rank, where, detail::current_error()));
  }

  auto gloo_options = c10d::ProcessGroupGloo::Options::create(timeout_);
  try {
    if (const char* ifname = std::getenv("GLOO_SOCKET_IFNAME")) {
      gloo_options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(ifname));
    } else if (detail::is_loopback(env_.master_addr)) {
      gloo_options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1"));
    } else {
      gloo_options->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
    }
    auto prefixed = c10::make_intrusive<c10d::PrefixStore>("multigpu/gloo", store_);
    gloo_ = c10::make_intrusive<c10d::ProcessGroupGloo>(prefixed, env_.rank, env_.world_size, gloo_options);
  } catch (...) {
    throw DistributedError(fmt::format("rank {}: the Gloo process group could not connect the {} processes: {}. "
                                       "On machines with several networks set GLOO_SOCKET_IFNAME to the interface "
                                       "that reaches the others",
                                       env_.rank, env_.world_size, detail::current_error()));
  }
  start_heartbeat();
}

inline void ProcessGroup::meet(const std::string& where) {
  // See Note [Rendezvous failures].
  const auto bytes = [](const std::string& text) { return std::vector<std::uint8_t>(text.begin(), text.end()); };
  const auto text = [](const std::vector<std::uint8_t>& data) { return std::string(data.begin(), data.end()); };
  const std::string kWorldKey = "multigpu/world";
  const std::string kMismatchKey = "multigpu/world_mismatch";
  const std::string me = fmt::format("{} (pid {})", detail::this_host(), ::getpid());
  store_->add("multigpu/joined", 1);

  // "4\nWORLD_SIZE\nrank 1 (host (pid N))": the world size, its variable, who said it.
  const std::string claim = fmt::format("{}\n{}\nrank {} ({})", env_.world_size, env_.world_size_source, env_.rank, me);
  const std::string first = text(store_->compareSet(kWorldKey, {}, bytes(claim)));
  const auto said = [](const std::string& stated) {
    const auto world_end = stated.find('\n');
    const auto source_end = stated.find('\n', world_end + 1);
    return fmt::format("{} with {}={}", stated.substr(source_end + 1),
                       stated.substr(world_end + 1, source_end - world_end - 1), stated.substr(0, world_end));
  };
  if (first.substr(0, first.find('\n')) != std::to_string(env_.world_size)) {
    store_->set(kMismatchKey, bytes(fmt::format("the processes were started with different numbers of processes: {}, "
                                                "but {}; start every process with the same {}",
                                                said(first), said(claim), env_.world_size_source)));
  }
  const auto fail_on_mismatch = [&] {
    const std::string reason = text(store_->get(kMismatchKey));
    store_->add("multigpu/told", 1);
    if (is_primary()) {  // it serves the store: it stays until every rank that came has read the reason
      const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(2);
      while (store_->add("multigpu/told", 0) < store_->add("multigpu/joined", 0) &&
             std::chrono::steady_clock::now() < until) {
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
      }
    }
    throw DistributedError(fmt::format("rank {}: {}", env_.rank, reason));
  };

  // Check in, then wait for everyone, naming who never came.
  std::vector<std::string> keys;
  for (int r = 0; r < env_.world_size; ++r) keys.push_back(fmt::format("multigpu/rank/{}", r));
  if (store_->check({kMismatchKey})) fail_on_mismatch();
  store_->set(keys[static_cast<std::size_t>(env_.rank)], bytes(me));
  const auto deadline = std::chrono::steady_clock::now() + timeout_;
  const auto poll = std::clamp(timeout_ / 50, std::chrono::milliseconds(10), std::chrono::milliseconds(100));
  while (!store_->check(keys)) {
    if (store_->check({kMismatchKey})) fail_on_mismatch();
    if (std::chrono::steady_clock::now() >= deadline) {
      std::vector<std::string> missing;
      for (const auto& key : keys) {
        if (!store_->check({key})) missing.push_back(key.substr(key.rfind('/') + 1));
      }
      throw DistributedError(fmt::format("rank {}: {} of {} processes did not join the rendezvous at {} within {} ms "
                                         "(missing rank{} {}); were they started, with the same MASTER_ADDR and "
                                         "MASTER_PORT?",
                                         env_.rank, missing.size(), env_.world_size, where, timeout_.count(),
                                         missing.size() == 1 ? "" : "s", fmt::join(missing, ", ")));
    }
    std::this_thread::sleep_for(poll);
  }
  for (std::size_t r = 0; r < keys.size(); ++r) peers_[r] = text(store_->get(keys[r]));
}

inline void ProcessGroup::start_heartbeat() {
  heartbeat_ = std::thread([this, interval = heartbeat_interval()] {
    const std::string key = heartbeat_key(env_.rank);
    std::unique_lock<std::mutex> lock(heartbeat_mutex_);
    while (!heartbeat_stop_) {
      lock.unlock();
      try {
        heartbeat_store_->add(key, 1);
      } catch (...) {
        return;  // the store is gone: a failing collective will say so (nothing may escape a thread)
      }
      lock.lock();
      heartbeat_cv_.wait_for(lock, interval, [this] { return heartbeat_stop_; });
    }
  });
}

inline std::string ProcessGroup::diagnose_peers() {
  const auto interval = heartbeat_interval();
  std::vector<std::int64_t> before(static_cast<std::size_t>(env_.world_size));
  try {
    for (int r = 0; r < env_.world_size; ++r) before[static_cast<std::size_t>(r)] = store_->add(heartbeat_key(r), 0);
    std::this_thread::sleep_for(interval * 3);
    std::vector<std::string> silent;
    for (int r = 0; r < env_.world_size; ++r) {
      if (r == env_.rank) continue;
      if (store_->add(heartbeat_key(r), 0) == before[static_cast<std::size_t>(r)]) {
        silent.push_back(fmt::format("rank {} ({})", r, peers_[static_cast<std::size_t>(r)]));
      }
    }
    if (silent.empty()) return "every other rank is still alive, so one of them is stuck or took another path";
    return fmt::format("{} stopped responding (exited or killed)", fmt::join(silent, ", "));
  } catch (...) {
    return fmt::format("rank 0 ({}), which serves the rendezvous store, is unreachable (exited or killed)",
                       peers_.empty() ? "" : peers_[0]);
  }
}

template <class Fn>
void ProcessGroup::collective(const char* what, Fn&& fn) {
  std::lock_guard<std::mutex> lock(mutex_);
  check_usable(what);
  const auto start = std::chrono::steady_clock::now();
  try {
    fn();
  } catch (...) {
    const std::string cause = detail::current_error();
    const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - start);
    broken_ = fmt::format("rank {}: {} across {} processes failed after {} ms (time-out {} ms): {}; {}", env_.rank,
                          what, env_.world_size, ms.count(), timeout_.count(), diagnose_peers(), cause);
    throw DistributedError(broken_);
  }
}

inline void ProcessGroup::all_reduce_sum(const at::Tensor& tensor) {
  if (!distributed()) return;
  // bfloat16 (compressed gradient buckets) where Gloo has none: summed as
  // float32, so it works, without the halved bytes (said once).
  const bool widen = tensor.scalar_type() == at::kBFloat16 && !compat::kGlooHasBFloat16;
  if (widen) {
    static std::once_flag said;
    std::call_once(said, [] {
      warn("this LibTorch's Gloo cannot reduce bfloat16: bf16 gradient buckets travel between processes as float32 "
           "(LibTorch 2.x sends them as bf16; fp16_compress_hook halves the bytes here)");
    });
  }
  collective("all-reduce", [&] {
    std::vector<at::Tensor> tensors{widen ? tensor.to(at::kFloat) : tensor};
    auto work = gloo_->allreduce(tensors, c10d::AllreduceOptions());
    work->wait(timeout_);
    if (widen) tensor.copy_(tensors[0]);
  });
}

inline void ProcessGroup::broadcast(const at::Tensor& tensor, int root) {
  if (!distributed()) return;
  collective("broadcast", [&] {
    std::vector<at::Tensor> tensors{tensor};
    c10d::BroadcastOptions options;
    options.rootRank = root;
    auto work = gloo_->broadcast(tensors, options);
    work->wait(timeout_);
  });
}

inline void ProcessGroup::barrier() {
  if (!distributed()) return;
  collective("barrier", [&] { gloo_->barrier(c10d::BarrierOptions())->wait(timeout_); });
}

inline std::vector<std::string> ProcessGroup::all_gather_text(const std::string& value) {
  if (!distributed()) return {value};
  std::vector<std::string> out;
  collective("exchange through the store", [&] {
    const std::int64_t round = rounds_++;
    store_->set(fmt::format("multigpu/gather/{}/{}", round, env_.rank),
                std::vector<std::uint8_t>(value.begin(), value.end()));
    for (int r = 0; r < env_.world_size; ++r) {
      const auto bytes = store_->get(fmt::format("multigpu/gather/{}/{}", round, r));  // waits, up to the time-out
      out.emplace_back(bytes.begin(), bytes.end());
    }
  });
  return out;
}

#else  // !MULTIGPU_WITH_DISTRIBUTED: a single process only (the constructor refuses more)

inline void ProcessGroup::connect() {}
inline void ProcessGroup::start_heartbeat() {}
inline std::string ProcessGroup::diagnose_peers() { return ""; }
inline void ProcessGroup::all_reduce_sum(const at::Tensor&) {}
inline void ProcessGroup::broadcast(const at::Tensor&, int) {}
inline void ProcessGroup::barrier() {}
inline std::vector<std::string> ProcessGroup::all_gather_text(const std::string& value) { return {value}; }

#endif  // MULTIGPU_WITH_DISTRIBUTED

inline void ProcessGroup::stop_heartbeat() noexcept {
  {
    std::lock_guard<std::mutex> lock(heartbeat_mutex_);
    heartbeat_stop_ = true;
  }
  heartbeat_cv_.notify_all();
  if (heartbeat_.joinable()) heartbeat_.join();
}

inline void ProcessGroup::check_usable(const char* what) const {
  if (!broken_.empty()) {
    throw DistributedError(fmt::format("{}: the process group is unusable after an earlier failure ({})", what,
                                       broken_));
  }
}

inline DataParallelOptions ProcessGroup::data_parallel_options(DataParallelOptions base) {
  if (!distributed()) return base;
  // The options, and the communicators they make, keep the group alive.
  base.make_communicator = [self = shared_from_this()](const std::vector<ReplicaContext>& replicas) {
    return self->make_communicator(replicas);
  };
  // The group's own time-out must fire first: it names the silent ranks.
  // DataParallel's is the back-stop, after the group's diagnosis.
  base.collective_timeout = std::max(base.collective_timeout, timeout_ + 4 * heartbeat_interval() + std::chrono::seconds(2));
  base.process_rank = env_.rank;
  base.processes = env_.world_size;
  return base;
}

inline std::unique_ptr<Communicator> ProcessGroup::make_communicator(const std::vector<ReplicaContext>& replicas) {
  if (!distributed()) return multigpu::make_communicator(replicas, "auto");
#if MULTIGPU_WITH_NCCL
  bool distinct_gpus = true;
  for (std::size_t i = 0; i < replicas.size(); ++i) {
    distinct_gpus = distinct_gpus && replicas[i].device().is_cuda();
    for (std::size_t j = 0; j < i; ++j) distinct_gpus = distinct_gpus && replicas[j].device() != replicas[i].device();
  }
  // Every process must take the same path: agree on it first. A vote is
  // "<distinct GPUs: 0|1> <replicas> <host/PCI bus id of each GPU>...": NCCL
  // refuses two ranks on one GPU, so processes sharing one (several
  // processes on a one-GPU machine) use Gloo.
  std::string vote_text = fmt::format("{} {}", distinct_gpus ? 1 : 0, replicas.size());
  for (const auto& replica : replicas) {
    if (!replica.device().is_cuda()) continue;
    char bus_id[64] = {};
    if (cudaDeviceGetPCIBusId(bus_id, sizeof(bus_id), replica.device().index()) != cudaSuccess) {
      cudaGetLastError();
      std::snprintf(bus_id, sizeof(bus_id), "cuda:%d", static_cast<int>(replica.device().index()));
    }
    vote_text += fmt::format(" {}/{}", detail::this_host(), bus_id);
  }
  const auto votes = all_gather_text(vote_text);
  bool all_gpus = true;
  std::size_t total = 0;
  std::size_t first = 0;
  std::vector<std::string> gpus;
  std::string shared_gpu;
  for (int r = 0; r < size(); ++r) {
    std::istringstream vote(votes[static_cast<std::size_t>(r)]);
    int distinct = 0;
    std::size_t count = 0;
    vote >> distinct >> count;
    all_gpus = all_gpus && distinct == 1;
    if (r < rank()) first += count;
    total += count;
    for (std::string gpu; vote >> gpu;) {
      if (std::find(gpus.begin(), gpus.end(), gpu) != gpus.end() && shared_gpu.empty()) shared_gpu = gpu;
      gpus.push_back(gpu);
    }
  }
  if (all_gpus && !shared_gpu.empty()) {
    if (is_primary()) {
      log(LogLevel::kInfo, fmt::format("the processes share the GPU {} and NCCL refuses two ranks on one GPU: the "
                                       "gradients go through Gloo (slower; one process per GPU uses NCCL)",
                                       shared_gpu));
    }
    all_gpus = false;
  }
  if (all_gpus) {
    NcclWorld world;
    if (is_primary()) MULTIGPU_NCCL_CHECK(ncclGetUniqueId(&world.id), "rank 0", nullptr);
    const std::string id_text =
        all_gather_text(std::string(reinterpret_cast<const char*>(&world.id), sizeof(world.id)))[0];
    std::copy(id_text.begin(), id_text.end(), reinterpret_cast<char*>(&world.id));
    world.ranks = static_cast<int>(total);
    world.first_rank = static_cast<int>(first);
    return std::make_unique<NcclCommunicator>(replicas, world, timeout_);
  }
#endif
  return std::make_unique<CrossProcessCommunicator>(replicas, shared_from_this());
}

inline CrossProcessCommunicator::CrossProcessCommunicator(std::vector<ReplicaContext> replicas,
                                                          std::shared_ptr<ProcessGroup> group)
    : replicas_(replicas), local_(std::move(replicas)), group_(std::move(group)) {
  const auto counts = group_->all_gather_text(std::to_string(local_.size()));
  for (const auto& count : counts) world_replicas_ += std::stoul(count);
}

template <class Fn>
void CrossProcessCommunicator::on_host(const at::Tensor& tensor, std::size_t r, Fn&& fn) {
  compat::NoGradGuard no_grad;
  const bool staged = !tensor.device().is_cpu() || !tensor.is_contiguous();
  at::Tensor host = staged ? tensor.to(at::kCPU).contiguous() : tensor;
  fn(host);
  if (staged) {
    const ReplicaContext::Scope scope(replicas_[r]);
    tensor.copy_(host);
    replicas_[r].synchronize();
  }
}

inline void CrossProcessCommunicator::all_reduce(const std::vector<at::Tensor>& tensors, ReduceOp op) {
  local_.all_reduce(tensors, ReduceOp::kSum);
  on_host(tensors[0], 0, [&](const at::Tensor& host) {
    group_->all_reduce_sum(host);
    if (op == ReduceOp::kAverage) host.div_(static_cast<double>(world_replicas_));
  });
  local_.broadcast(tensors, 0);
}

inline void CrossProcessCommunicator::broadcast(const std::vector<at::Tensor>& tensors, std::size_t root) {
  if (root >= tensors.size()) throw CommError(fmt::format("broadcast: root {} is not a replica", root));
  on_host(tensors[root], root, [&](const at::Tensor& host) { group_->broadcast(host, 0); });
  local_.broadcast(tensors, root);
}

}  // namespace multigpu
