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
/// with a DistributedError after DistributedOptions::timeout. The error names
/// the ranks that stopped answering: every process adds to a heartbeat
/// counter in the store once a second, and after a failure the counters that
/// no longer move show who is gone. A failed collective leaves the group
/// broken (later collectives throw at once): the processes no longer agree
/// on what was reduced.

#include "multigpu/config.hpp"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <ATen/ATen.h>
#include <fmt/core.h>
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

inline bool is_loopback(const std::string& addr) {
  return addr == "localhost" || addr.rfind("127.", 0) == 0 || addr == "::1";
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
  } catch (const std::exception&) {
    // The store is gone (rank 0 ended first): nothing left to say goodbye to.
  }
  gloo_.reset();
  heartbeat_store_.reset();
  store_.reset();
#endif
}

#if MULTIGPU_WITH_DISTRIBUTED

inline void ProcessGroup::connect() {
  const std::string where = fmt::format("{}:{}", env_.master_addr, env_.master_port);
  c10d::TCPStoreOptions options;
  options.port = static_cast<std::uint16_t>(env_.master_port);
  options.isServer = is_primary();
  options.numWorkers = static_cast<std::size_t>(env_.world_size);
  options.waitWorkers = false;  // we wait ourselves, to name who is missing
  options.timeout = timeout_;
  try {
    store_ = c10::make_intrusive<c10d::TCPStore>(env_.master_addr, options);
    options.isServer = false;
    heartbeat_store_ = c10::make_intrusive<c10d::TCPStore>(env_.master_addr, options);
  } catch (const std::exception& e) {
    const std::string cause = e.what();
    if (is_primary()) {
      throw DistributedError(fmt::format(
          "rank 0 could not serve the rendezvous store on port {} (MASTER_PORT){}: {}. Choose a free MASTER_PORT",
          env_.master_port,
          cause.find("in use") != std::string::npos || cause.find("EADDRINUSE") != std::string::npos
              ? " because the port is in use"
              : "",
          detail::first_line(cause)));
    }
    throw DistributedError(fmt::format("rank {} could not reach the rendezvous store of rank 0 at {} (MASTER_ADDR:"
                                       "MASTER_PORT) within {} ms: {}. Is rank 0 running, and are MASTER_ADDR and "
                                       "MASTER_PORT the same for every process?",
                                       env_.rank, where, timeout_.count(), detail::first_line(cause)));
  }

  // Check in, then wait for everyone, naming who never came.
  const std::string me = fmt::format("{} (pid {}) world {}", detail::this_host(), ::getpid(), env_.world_size);
  store_->set(fmt::format("multigpu/rank/{}", env_.rank), std::vector<std::uint8_t>(me.begin(), me.end()));
  std::vector<std::string> keys;
  for (int r = 0; r < env_.world_size; ++r) keys.push_back(fmt::format("multigpu/rank/{}", r));
  try {
    store_->wait(keys, timeout_);
  } catch (const std::exception& e) {
    std::vector<std::string> missing;
    try {
      for (int r = 0; r < env_.world_size; ++r) {
        if (!store_->check({keys[static_cast<std::size_t>(r)]})) missing.push_back(std::to_string(r));
      }
    } catch (const std::exception&) {
      missing.clear();
    }
    throw DistributedError(fmt::format("rank {}: {} of {} processes did not join the rendezvous at {} within {} ms "
                                       "(missing rank{} {}): {}",
                                       env_.rank, missing.size(), env_.world_size, where, timeout_.count(),
                                       missing.size() == 1 ? "" : "s", fmt::format("{}", fmt::join(missing, ", ")),
                                       detail::first_line(e.what())));
  }
  for (int r = 0; r < env_.world_size; ++r) {
    const auto bytes = store_->get(keys[static_cast<std::size_t>(r)]);
    const std::string text(bytes.begin(), bytes.end());
    const auto world_at = text.rfind(" world ");
    peers_[static_cast<std::size_t>(r)] = text.substr(0, world_at);
    const std::string their_world = world_at == std::string::npos ? "?" : text.substr(world_at + 7);
    if (their_world != std::to_string(env_.world_size)) {
      throw DistributedError(fmt::format("rank {} says the job has {} processes, rank {} ({}) says {}: every process "
                                         "must be started with the same {}",
                                         env_.rank, env_.world_size, r, peers_[static_cast<std::size_t>(r)],
                                         their_world, env_.world_size_source));
    }
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
  } catch (const std::exception& e) {
    throw DistributedError(fmt::format("rank {}: the Gloo process group could not connect the {} processes: {}. "
                                       "On machines with several networks set GLOO_SOCKET_IFNAME to the interface "
                                       "that reaches the others",
                                       env_.rank, env_.world_size, detail::first_line(e.what())));
  }
  start_heartbeat();
}

inline void ProcessGroup::start_heartbeat() {
  heartbeat_ = std::thread([this, interval = heartbeat_interval()] {
    const std::string key = heartbeat_key(env_.rank);
    std::unique_lock<std::mutex> lock(heartbeat_mutex_);
    while (!heartbeat_stop_) {
      lock.unlock();
      try {
        heartbeat_store_->add(key, 1);
      } catch (const std::exception&) {
        return;  // the store is gone: a failing collective will say so
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
  } catch (const std::exception&) {
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
  } catch (const std::exception& e) {
    const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - start);
    broken_ = fmt::format("rank {}: {} across {} processes failed after {} ms (time-out {} ms): {}; {}", env_.rank,
                          what, env_.world_size, ms.count(), timeout_.count(), diagnose_peers(),
                          detail::first_line(e.what()));
    throw DistributedError(broken_);
  }
}

inline void ProcessGroup::all_reduce_sum(const at::Tensor& tensor) {
  if (!distributed()) return;
  collective("all-reduce", [&] {
    std::vector<at::Tensor> tensors{tensor};
    auto work = gloo_->allreduce(tensors, c10d::AllreduceOptions());
    work->wait(timeout_);
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
  // Every process must take the same path: agree on it first.
  const auto votes = all_gather_text(fmt::format("{} {}", distinct_gpus ? 1 : 0, replicas.size()));
  bool all_gpus = true;
  std::size_t total = 0;
  std::size_t first = 0;
  for (int r = 0; r < size(); ++r) {
    const auto& vote = votes[static_cast<std::size_t>(r)];
    all_gpus = all_gpus && vote[0] == '1';
    const std::size_t count = std::stoul(vote.substr(2));
    if (r < rank()) first += count;
    total += count;
  }
  if (all_gpus) {
    NcclWorld world;
    if (is_primary()) MULTIGPU_NCCL_CHECK(ncclGetUniqueId(&world.id), "rank 0", nullptr);
    const std::string id_text =
        all_gather_text(std::string(reinterpret_cast<const char*>(&world.id), sizeof(world.id)))[0];
    std::copy(id_text.begin(), id_text.end(), reinterpret_cast<char*>(&world.id));
    world.ranks = static_cast<int>(total);
    world.first_rank = static_cast<int>(first);
    return std::make_unique<NcclCommunicator>(replicas, world);
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
