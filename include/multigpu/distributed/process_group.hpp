#pragma once
/// @file
/// ProcessGroup: this process's membership of a multi-process job, its
/// rendezvous, heartbeat and CPU collectives over c10d. Include
/// <multigpu/distributed.hpp>; see there for the whole picture.

#include "multigpu/config.hpp"

#include <algorithm>
#include <array>
#include <atomic>
#include <cerrno>
#include <csignal>
#include <chrono>
#include <condition_variable>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <ATen/ATen.h>
#include <fcntl.h>
#include <fmt/core.h>
#include <pthread.h>
#include <signal.h>
#include <unistd.h>

#include "multigpu/collective_trace.hpp"
#include "multigpu/comm.hpp"
#include "multigpu/data_parallel_options.hpp"
#include "multigpu/detail/compat.hpp"
#include "multigpu/distributed/rendezvous.hpp"
#include "multigpu/distributed_env.hpp"
#include "multigpu/error.hpp"
#include "multigpu/replica.hpp"

#if MULTIGPU_WITH_DISTRIBUTED
#ifndef USE_C10D_GLOO
#define USE_C10D_GLOO 1  // c10d's header shows ProcessGroupGloo only with it; the library has it
#endif
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#endif

namespace multigpu {

namespace detail {
/// The write end of the pipe that dump_trace_on_signal's handler writes to
/// (-1: no group dumps on a signal); an atomic int is lock-free, so reading
/// it in a signal handler is safe.
inline std::atomic<int>& trace_signal_pipe() {
  static std::atomic<int> fd{-1};
  return fd;
}
/// That pipe's ends, made on first use and never closed: a handler that
/// read the write end just before its group ended still writes into this
/// pipe, never into a descriptor whose number was reused since. The write
/// end never blocks, so a handler never waits for the dumping thread.
inline const std::array<int, 2>& trace_signal_pipe_ends() {
  static const std::array<int, 2> ends = [] {
    std::array<int, 2> fds{-1, -1};
    if (::pipe(fds.data()) != 0) {
      throw DistributedError(
          fmt::format("dump_trace_on_signal: no pipe for the signal handler: {}", std::strerror(errno)));
    }
    ::fcntl(fds[0], F_SETFD, FD_CLOEXEC);
    ::fcntl(fds[1], F_SETFD, FD_CLOEXEC);
    ::fcntl(fds[1], F_SETFL, O_NONBLOCK);
    return fds;
  }();
  return ends;
}
}  // namespace detail

/// This process's membership of a multi-process job (see the file comment).
/// Create one per process, before any DataParallel that uses it, and keep it
/// alive as long as they are.
class ProcessGroup : public ProcessCollectives, public std::enable_shared_from_this<ProcessGroup> {
 public:
  /// Reads the environment (explicit `options` override it) and, with more
  /// than one process, meets the others: rank 0 serves the store at
  /// MASTER_ADDR:MASTER_PORT, every rank checks in and waits for all the
  /// others, then the Gloo group connects. Throws DistributedError naming
  /// the variable, the address or the ranks missing.
  static std::shared_ptr<ProcessGroup> from_environment(const DistributedOptions& options = {},
                                                        const EnvLookup& lookup = process_environment()) {
    const DistributedEnv env = read_distributed_env(options, lookup);
    if (!env.note.empty()) fmt::print(stderr, "multigpu: {}\n", env.note);
    return std::shared_ptr<ProcessGroup>(new ProcessGroup(env, options.timeout, options.trace_size));
  }
  /// The same from an already read environment.
  static std::shared_ptr<ProcessGroup> create(const DistributedEnv& env,
                                              std::chrono::milliseconds timeout = std::chrono::minutes(5),
                                              std::size_t trace_size = 2000) {
    return std::shared_ptr<ProcessGroup>(new ProcessGroup(env, timeout, trace_size));
  }
  inline ~ProcessGroup() override;
  ProcessGroup(const ProcessGroup&) = delete;
  ProcessGroup& operator=(const ProcessGroup&) = delete;

  /// Where this process stands in the job.
  const DistributedEnv& env() const { return env_; }
  /// This process's global rank, 0..size()-1.
  int rank() const override { return env_.rank; }
  /// Number of processes in the job.
  int size() const override { return env_.world_size; }
  /// Whether this is global rank 0 (the one that writes plain model files).
  bool is_primary() const { return env_.rank == 0; }
  /// Whether the job has more than one process.
  bool distributed() const { return env_.distributed(); }
  /// Time-out of the rendezvous, of every collective and of the wait for a peer.
  std::chrono::milliseconds timeout() const { return timeout_; }

  /// `base` with the communicator that reaches every process (unchanged for
  /// a single process). What it makes keeps the group alive.
  inline DataParallelOptions data_parallel_options(DataParallelOptions base = {});
  /// The communicator over `replicas` (this process's) and every other
  /// process's: the processes agree on the facts, and choose_backend()
  /// (multigpu/backend.hpp) decides: NCCL over all GPUs when every replica
  /// is on a GPU of its own and NCCL is compiled in, else local reduction
  /// plus Gloo. Collective: every process calls it, in the same order.
  inline std::unique_ptr<Communicator> make_communicator(const std::vector<ReplicaContext>& replicas);

  /// The device spec this process should use: with one process per device
  /// (LOCAL_WORLD_SIZE > 1) "auto" becomes this process's GPU, LOCAL_RANK;
  /// anything else is returned as it is.
  std::string local_device_spec(const std::string& spec) const {
    if (env_.local_world_size > 1 && (spec == "auto" || spec == "cuda")) return std::to_string(env_.local_rank);
    return spec;
  }

  /// In place on a CPU tensor of every process: the sum over processes.
  inline void all_reduce_sum(const at::Tensor& tensor) override;
  /// In place on a CPU tensor of every process: a copy of `root`'s.
  inline void broadcast(const at::Tensor& tensor, int root) override;
  /// Returns when every process has called it.
  inline void barrier();
  /// Every process's `value`, by rank (through the store; for small facts).
  inline std::vector<std::string> all_gather_text(const std::string& value) override;
  /// Every process's reason for failing the current step ("" where it did
  /// not), by rank: one all-reduce of one number, and the reasons through
  /// the store only when a process failed. Collective.
  inline std::vector<std::string> agree_on_failures(const std::string& failure);

  /// The last collectives this process issued across processes: dump it
  /// with trace().text() or trace().json() at any time, from any thread
  /// (see Note [The collective trace]).
  const CollectiveTrace& trace() const { return trace_; }
  /// From now on, signal `signal` (SIGUSR2 by default) makes this process
  /// write its trace's text to file descriptor `fd` (stderr by default):
  /// the handler only writes a byte to a pipe (async-signal-safe), a thread
  /// of the group writes the dump. One group per process at a time; undone
  /// when the group ends. See Note [The collective trace], 4.
  inline void dump_trace_on_signal(int signal = SIGUSR2, int fd = STDERR_FILENO);

 private:
  inline ProcessGroup(DistributedEnv env, std::chrono::milliseconds timeout, std::size_t trace_size);
  inline void connect();
  /// Checks in at the store and waits for the others (see Note [Rendezvous failures]).
  inline void meet(const std::string& where, const std::string& record);
  inline void start_heartbeat();
  inline void stop_heartbeat() noexcept;
  /// Runs a collective under the group's lock, recording it in the trace
  /// (`kind`, `bytes`, `dtype`, and the thread's CollectivePurpose), and
  /// turning failures and time-outs into a DistributedError that names the
  /// silent ranks (rank, address, host), the collective in flight, as its
  /// trace record says it, and where the processes' traces differ. `what`
  /// names it when the group refuses it after an earlier failure.
  template <class Fn>
  void collective(const char* what, const char* kind, std::int64_t bytes, const char* dtype, Fn&& fn);
  /// Who of the others still beats (see Note [Rendezvous failures]): sets
  /// `silent` to the ranks whose heartbeat stopped, and `store_answered`
  /// to whether the store answered at all.
  inline std::string diagnose_peers(bool& store_answered, std::vector<bool>& silent);
  /// Posts this process's trace summary to the store and compares it with
  /// the others' (see Note [The collective trace], 3), waiting only for
  /// those not `silent`.
  inline std::string compare_traces(const std::vector<bool>& silent);
  std::string trace_key(int rank) const { return fmt::format("multigpu/trace/{}", rank); }
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
  CollectiveTrace trace_;
#if MULTIGPU_WITH_DISTRIBUTED
  c10::intrusive_ptr<c10d::TCPStore> store_;
  c10::intrusive_ptr<c10d::TCPStore> heartbeat_store_;  // its own connection, so beats never wait for a collective
  c10::intrusive_ptr<c10d::ProcessGroupGloo> gloo_;
#endif
  /// The heartbeat thread's state, shared with it: the thread may outlive
  /// the group when a store operation blocks (see Note [Rendezvous failures]).
  struct Heartbeat {
    std::mutex mutex;
    std::condition_variable cv;
    bool stop = false;
    bool done = true;  // the thread ended (or never started)
  };
  std::shared_ptr<Heartbeat> heartbeat_ = std::make_shared<Heartbeat>();
  std::thread dumper_;  // see dump_trace_on_signal
  int dump_signal_ = 0;
  struct sigaction dump_previous_ {};
};

namespace detail {

// Note [SIGPIPE and Gloo's threads]
// Gloo writes to its sockets with writev(), which has no MSG_NOSIGNAL: a
// write to a peer that is gone raises SIGPIPE, whose default action ends
// the process, before Gloo can turn EPIPE into an error naming the peer.
// Python ignores SIGPIPE, so PyTorch never meets this; a C++ program does
// (seen when a rank stopped with SIGSTOP goes on after its peer ended: it
// died by SIGPIPE instead of naming the peer). Rather than change the
// process's disposition, the threads that write to Gloo's sockets block
// SIGPIPE: Gloo's device thread and ProcessGroupGloo's workers are made
// while the constructing thread blocks it, and inherit its mask; that
// thread takes any SIGPIPE left pending on itself (from the connection of
// the full mesh) before unblocking. A signal blocked in a thread that
// raised it stays pending there, harmless, and writev() returns EPIPE.

/// Blocks SIGPIPE in this thread while it lives (see Note [SIGPIPE and Gloo's threads]).
class SigpipeBlocked {
 public:
  SigpipeBlocked() {
    sigemptyset(&pipe_);
    sigaddset(&pipe_, SIGPIPE);
    ::pthread_sigmask(SIG_BLOCK, &pipe_, &previous_);
  }
  ~SigpipeBlocked() {
    if (sigismember(&previous_, SIGPIPE) == 1) return;
    const timespec none{};
    while (::sigtimedwait(&pipe_, nullptr, &none) == SIGPIPE) {
    }
    ::pthread_sigmask(SIG_SETMASK, &previous_, nullptr);
  }
  SigpipeBlocked(const SigpipeBlocked&) = delete;
  SigpipeBlocked& operator=(const SigpipeBlocked&) = delete;

 private:
  sigset_t pipe_{};
  sigset_t previous_{};
};

}  // namespace detail

// ---------------------------------------------------------------------------
// Definitions

inline ProcessGroup::ProcessGroup(DistributedEnv env, std::chrono::milliseconds timeout, std::size_t trace_size)
    : env_(std::move(env)), timeout_(timeout), trace_(trace_size) {
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
  if (dumper_.joinable()) {
    // The handler first, then its pipe: the pipe stays open (see trace_signal_pipe_ends).
    ::sigaction(dump_signal_, &dump_previous_, nullptr);
    detail::trace_signal_pipe().store(-1);
    const char quit = 'q';
    while (::write(detail::trace_signal_pipe_ends()[1], &quit, 1) != 1 && (errno == EAGAIN || errno == EINTR)) {
      std::this_thread::sleep_for(std::chrono::milliseconds(1));  // full of dump requests: the dumper drains it
    }
    dumper_.join();
  }
#if MULTIGPU_WITH_DISTRIBUTED
  if (!store_) return;
  // Rank 0 serves the store: it stays until every rank has said goodbye (or
  // a short while, when the job already failed), so that no rank loses the
  // store while it still talks to it.
  const auto limit = broken_.empty() ? std::min(timeout_, std::chrono::milliseconds(30000))
                                     : std::chrono::milliseconds(1000);
  try {
    // A rank that went on and finished is still heard by one that fails
    // later (Note [The collective trace], 3): its summary goes with its goodbye.
    const std::string summary = broken_.empty() && trace_.capacity() > 0 ? trace_.summary() : std::string();
    detail::finish_within(limit + std::chrono::milliseconds(500),
                          [store = store_, primary = is_primary(), world = env_.world_size, limit, summary,
                           key = trace_key(env_.rank)] {
                            if (!summary.empty()) store->set(key, std::vector<std::uint8_t>(summary.begin(), summary.end()));
                            store->add("multigpu/finished", 1);
                            if (!primary) return;
                            const auto deadline = std::chrono::steady_clock::now() + limit;
                            while (store->add("multigpu/finished", 0) < world &&
                                   std::chrono::steady_clock::now() < deadline) {
                              std::this_thread::sleep_for(std::chrono::milliseconds(10));
                            }
                          });
  } catch (...) {
    // The store is gone (rank 0 ended first): nothing left to say goodbye to.
  }
  gloo_.reset();
  heartbeat_store_.reset();
  store_.reset();
#endif
}

#if MULTIGPU_WITH_DISTRIBUTED

inline void ProcessGroup::connect() {
  // See Note [Rendezvous failures].
  const std::string where = fmt::format("{}:{}", env_.master_addr, env_.master_port);
  const detail::AddressList addresses = detail::resolve_master(env_);
  // See Note [Choosing the network interface].
  const detail::NetworkChoice network = detail::choose_network(env_, addresses.get(), std::getenv("GLOO_SOCKET_IFNAME"),
                                                               std::getenv("NCCL_SOCKET_IFNAME"));
  log(LogLevel::kInfo, network.description);
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
    // How the others name this process in their errors: its address, host and pid.
    const std::string address =
        network.address.empty() ? fmt::format("{}", fmt::join(network.interfaces, ",")) : network.address;
    meet(where, fmt::format("{} on {}, pid {}", address, detail::this_host(), ::getpid()));
  } catch (const DistributedError&) {
    throw;
  } catch (...) {
    throw DistributedError(fmt::format("rank {}: the rendezvous store at {} stopped answering during the rendezvous "
                                       "({}): did rank 0 end? Its output says why",
                                       env_.rank, where, detail::current_error()));
  }

  auto gloo_options = c10d::ProcessGroupGloo::Options::create(timeout_);
  // See Note [SIGPIPE and Gloo's threads].
  const detail::SigpipeBlocked sigpipe_blocked;
  try {
    for (const auto& name : network.interfaces) {
      gloo_options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(name));
    }
    if (network.interfaces.empty()) {
      gloo_options->devices.push_back(network.address.empty()
                                          ? c10d::ProcessGroupGloo::createDefaultDevice()
                                          : c10d::ProcessGroupGloo::createDeviceForHostname(network.address));
    }
    auto prefixed = c10::make_intrusive<c10d::PrefixStore>("multigpu/gloo", store_);
    gloo_ = c10::make_intrusive<c10d::ProcessGroupGloo>(prefixed, env_.rank, env_.world_size, gloo_options);
  } catch (...) {
    throw DistributedError(fmt::format("rank {}: the Gloo process group could not connect the {} processes: {} ({}). "
                                       "Set GLOO_SOCKET_IFNAME to the interface that reaches the others; this "
                                       "host's are {}",
                                       env_.rank, env_.world_size, detail::current_error(), network.description,
                                       detail::interfaces_here()));
  }
  start_heartbeat();
}

inline void ProcessGroup::meet(const std::string& where, const std::string& record) {
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
  store_->set(keys[static_cast<std::size_t>(env_.rank)], bytes(record));
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
  // See Note [Rendezvous failures]: the thread owns what it touches, and is
  // left behind when a beat blocks on a store that no longer answers.
  heartbeat_->done = false;
  std::thread([state = heartbeat_, store = heartbeat_store_, key = heartbeat_key(env_.rank),
               interval = heartbeat_interval()]() mutable {
    std::unique_lock<std::mutex> lock(state->mutex);
    while (!state->stop) {
      lock.unlock();
      try {
        store->add(key, 1);
      } catch (...) {
        lock.lock();
        break;  // the store is gone: a failing collective will say so (nothing may escape a thread)
      }
      lock.lock();
      state->cv.wait_for(lock, interval, [&] { return state->stop; });
    }
    store.reset();
    state->done = true;
    state->cv.notify_all();
  }).detach();
}

inline std::string ProcessGroup::diagnose_peers(bool& store_answered, std::vector<bool>& silent_ranks) {
  // See Note [Rendezvous failures]: the store may not answer at all.
  const auto interval = heartbeat_interval();
  const auto limit = interval * 4 + std::chrono::milliseconds(1000);
  auto answer = std::make_shared<std::string>();
  auto stopped = std::make_shared<std::vector<bool>>(peers_.size(), false);
  const std::string store_host = fmt::format("rank 0 ({}), which serves the rendezvous store,", peers_[0]);
  try {
    const bool answered = detail::finish_within(limit, [answer, stopped, store = store_, peers = peers_,
                                                        rank = env_.rank, interval] {
      const auto key = [](std::size_t r) { return fmt::format("multigpu/heartbeat/{}", r); };
      std::vector<std::int64_t> before(peers.size());
      for (std::size_t r = 0; r < peers.size(); ++r) before[r] = store->add(key(r), 0);
      std::this_thread::sleep_for(interval * 3);
      std::vector<std::string> silent;
      for (std::size_t r = 0; r < peers.size(); ++r) {
        if (static_cast<int>(r) == rank) continue;
        if (store->add(key(r), 0) == before[r]) {
          silent.push_back(fmt::format("rank {} ({})", r, peers[r]));
          (*stopped)[r] = true;
        }
      }
      *answer = silent.empty()
                    ? "every other rank is still alive, so one of them is stuck or took another path"
                    : fmt::format("{} stopped responding (exited, killed, stopped, or cut off from the network)",
                                  fmt::join(silent, ", "));
    });
    store_answered = answered;
    if (answered) {
      silent_ranks = *stopped;  // written before the thread ended, which finish_within waited for
      return *answer;
    }
    return fmt::format("{} did not answer within {} ms (exited, killed, stopped, or cut off from this host)", store_host,
                       limit.count());
  } catch (...) {
    return fmt::format("{} did not answer ({}: exited, killed, stopped, or cut off from this host)", store_host,
                       detail::current_error());
  }
}

template <class Fn>
void ProcessGroup::collective(const char* what, const char* kind, std::int64_t bytes, const char* dtype, Fn&& fn) {
  std::lock_guard<std::mutex> lock(mutex_);
  check_usable(what);
  const auto start = std::chrono::steady_clock::now();
  const std::int64_t sequence = trace_.start(kind, bytes, dtype);
  try {
    fn();
  } catch (...) {
    trace_.finish(sequence, false);
    const std::string cause = detail::current_error();
    const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - start);
    // What was in flight, as the trace records it (also with no trace kept).
    CollectiveRecord in_flight;
    in_flight.sequence = sequence;
    std::snprintf(in_flight.kind, sizeof(in_flight.kind), "%s", kind);
    std::snprintf(in_flight.dtype, sizeof(in_flight.dtype), "%s", dtype);
    CollectivePurpose::write(in_flight.purpose, sizeof(in_flight.purpose));
    in_flight.bytes = bytes;
    bool store_answered = false;
    std::vector<bool> silent(peers_.size(), false);
    const std::string peers = diagnose_peers(store_answered, silent);
    const std::string traces = store_answered ? compare_traces(silent) : std::string();
    broken_ = fmt::format("rank {}: {} across {} processes failed after {} ms (time-out {} ms): {}; {}{}{}",
                          env_.rank, in_flight.describe(), env_.world_size, ms.count(), timeout_.count(), peers,
                          cause, traces.empty() ? "" : "; ", traces);
    throw DistributedError(broken_);
  }
  trace_.finish(sequence, true);
}

inline std::string ProcessGroup::compare_traces(const std::vector<bool>& silent) {
  if (trace_.capacity() == 0) return "";
  // The store is asked through finish_within (see Note [Rendezvous failures]):
  // what was read when the limit passes is compared, the rest did not answer.
  struct Exchange {
    std::mutex mutex;
    std::vector<std::string> summaries;
  };
  auto exchange = std::make_shared<Exchange>();
  exchange->summaries.resize(static_cast<std::size_t>(env_.world_size));
  exchange->summaries[static_cast<std::size_t>(env_.rank)] = trace_.summary();
  // The others fail at about the same time (they wait as long): give them
  // a few heartbeats to post theirs; one whose heartbeat stopped is read
  // once (it posted its summary when it ended, if it ended cleanly).
  const auto wait = std::max(heartbeat_interval() * 6, std::chrono::milliseconds(2000));
  std::vector<std::string> keys;
  for (int r = 0; r < env_.world_size; ++r) keys.push_back(trace_key(r));
  try {
    detail::finish_within(wait + std::chrono::milliseconds(1000), [exchange, store = store_, keys, silent,
                                                                   rank = env_.rank,
                                                                   mine = exchange->summaries[static_cast<std::size_t>(
                                                                       env_.rank)],
                                                                   wait] {
      store->set(keys[static_cast<std::size_t>(rank)], std::vector<std::uint8_t>(mine.begin(), mine.end()));
      const auto deadline = std::chrono::steady_clock::now() + wait;
      for (std::size_t r = 0; r < keys.size(); ++r) {
        if (static_cast<int>(r) == rank) continue;
        while (!silent[r] && !store->check({keys[r]}) && std::chrono::steady_clock::now() < deadline) {
          std::this_thread::sleep_for(std::chrono::milliseconds(20));
        }
        if (!store->check({keys[r]})) continue;
        const auto bytes = store->get(keys[r]);
        std::lock_guard<std::mutex> lock(exchange->mutex);
        exchange->summaries[r].assign(bytes.begin(), bytes.end());
      }
    });
  } catch (...) {
    // The store is gone (rank 0 ended): compare what was read; the rest did not answer.
  }
  std::lock_guard<std::mutex> lock(exchange->mutex);
  return CollectiveTrace::first_difference(exchange->summaries);
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
  collective("all-reduce", "all_reduce", static_cast<std::int64_t>(tensor.nbytes()), c10::toString(tensor.scalar_type()), [&] {
    std::vector<at::Tensor> tensors{widen ? tensor.to(at::kFloat) : tensor};
    auto work = gloo_->allreduce(tensors, c10d::AllreduceOptions());
    work->wait(timeout_);
    if (widen) tensor.copy_(tensors[0]);
  });
}

inline void ProcessGroup::broadcast(const at::Tensor& tensor, int root) {
  if (!distributed()) return;
  collective("broadcast", "broadcast", static_cast<std::int64_t>(tensor.nbytes()), c10::toString(tensor.scalar_type()), [&] {
    std::vector<at::Tensor> tensors{tensor};
    c10d::BroadcastOptions options;
    options.rootRank = root;
    auto work = gloo_->broadcast(tensors, options);
    work->wait(timeout_);
  });
}

inline void ProcessGroup::barrier() {
  if (!distributed()) return;
  collective("barrier", "barrier", 0, "-", [&] { gloo_->barrier(c10d::BarrierOptions())->wait(timeout_); });
}

inline std::vector<std::string> ProcessGroup::all_gather_text(const std::string& value) {
  if (!distributed()) return {value};
  std::vector<std::string> out;
  collective("exchange through the store", "all_gather", static_cast<std::int64_t>(value.size()), "text", [&] {
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
inline std::string ProcessGroup::diagnose_peers(bool&, std::vector<bool>&) { return ""; }
inline void ProcessGroup::all_reduce_sum(const at::Tensor&) {}
inline void ProcessGroup::broadcast(const at::Tensor&, int) {}
inline void ProcessGroup::barrier() {}
inline std::vector<std::string> ProcessGroup::all_gather_text(const std::string& value) { return {value}; }

#endif  // MULTIGPU_WITH_DISTRIBUTED

inline std::vector<std::string> ProcessGroup::agree_on_failures(const std::string& failure) {
  if (!distributed()) return {failure};
  const at::Tensor failed = at::full({1}, failure.empty() ? 0 : 1, at::TensorOptions().dtype(at::kInt));
  all_reduce_sum(failed);
  if (failed.item<int>() == 0) return std::vector<std::string>(static_cast<std::size_t>(size()));
  return all_gather_text(failure);
}

inline void ProcessGroup::dump_trace_on_signal(int signal, int fd) {
  if (dumper_.joinable()) throw DistributedError("dump_trace_on_signal: this process group dumps on a signal already");
  const auto& ends = detail::trace_signal_pipe_ends();
  int none = -1;
  if (!detail::trace_signal_pipe().compare_exchange_strong(none, ends[1])) {
    throw DistributedError("dump_trace_on_signal: another process group of this process dumps on a signal already");
  }
  struct sigaction action {};
  action.sa_handler = [](int) {
    const int saved = errno;
    const int pipe_in = detail::trace_signal_pipe().load();
    const char dump = 'd';
    if (pipe_in >= 0) (void)!::write(pipe_in, &dump, 1);  // full: a dump is pending anyway
    errno = saved;
  };
  sigemptyset(&action.sa_mask);
  action.sa_flags = SA_RESTART;
  if (::sigaction(signal, &action, &dump_previous_) != 0) {
    const int error = errno;
    detail::trace_signal_pipe().store(-1);
    throw DistributedError(fmt::format("dump_trace_on_signal: signal {} cannot be caught: {}", signal,
                                       std::strerror(error)));
  }
  dump_signal_ = signal;
  try {
    dumper_ = std::thread([this, fd, pipe_out = ends[0]] {
      for (char byte = 0;;) {
        const ssize_t got = ::read(pipe_out, &byte, 1);
        if (got < 0 && errno == EINTR) continue;
        if (got != 1 || byte == 'q') return;
        const std::string text = fmt::format("multigpu: rank {}'s collective trace ({} issued, the last {} kept):\n{}",
                                             env_.rank, trace_.issued(), trace_.capacity(), trace_.text());
        for (std::size_t done = 0; done < text.size();) {
          const ssize_t n = ::write(fd, text.data() + done, text.size() - done);
          if (n < 0 && errno == EINTR) continue;
          if (n <= 0) break;
          done += static_cast<std::size_t>(n);
        }
      }
    });
  } catch (...) {
    ::sigaction(signal, &dump_previous_, nullptr);
    detail::trace_signal_pipe().store(-1);
    throw;
  }
}

inline void ProcessGroup::stop_heartbeat() noexcept {
  // A beat blocked on a store that no longer answers is left behind after a
  // second (see Note [Rendezvous failures]); otherwise the thread ends at once.
  std::unique_lock<std::mutex> lock(heartbeat_->mutex);
  heartbeat_->stop = true;
  heartbeat_->cv.notify_all();
  heartbeat_->cv.wait_for(lock, std::chrono::milliseconds(1000), [this] { return heartbeat_->done; });
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
  base.agree_on_step = [self = shared_from_this()](const std::string& failure) {
    return self->agree_on_failures(failure);
  };
  base.exchange_text = [self = shared_from_this()](const std::string& value) { return self->all_gather_text(value); };
  return base;
}

}  // namespace multigpu

// ProcessGroup::make_communicator: the processes' vote on the facts of
// Note [Choosing a backend] (a class split over two files, as fmt's -inl
// headers).
#include "multigpu/distributed/communicator.hpp"
