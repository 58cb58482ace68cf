#pragma once
/// @file
/// The NCCL backend: one NCCL communicator per GPU of this process (part of
/// one over several processes with NcclWorld), collectives grouped with
/// ncclGroupStart/End on the calling thread's current streams (see
/// Note [Streams] in streams.hpp). Compiled only with
/// MULTIGPU_WITH_NCCL.
///
/// Collectives return once enqueued; a watchdog aborts the communicators
/// when one does not finish within the time-out or NCCL reports an error
/// (Note [NCCL watchdog]). An aborted communicator stays unusable: every
/// later call throws CommError saying why.

#include "multigpu/config.hpp"

#if MULTIGPU_WITH_NCCL

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <condition_variable>
#include <cstddef>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <ATen/ATen.h>
#include <c10/core/Event.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <fmt/core.h>
#include <nccl.h>

#include "multigpu/comm.hpp"
#include "multigpu/detail/compat.hpp"
#include "multigpu/detail/cuda.hpp"
#include "multigpu/detail/event_pool.hpp"
#include "multigpu/streams.hpp"
#include "multigpu/error.hpp"
#include "multigpu/replica.hpp"

namespace multigpu {

/// NCCL's version at run time, "2.21.5".
inline std::string nccl_version_string() {
  int version = 0;
  if (ncclGetVersion(&version) != ncclSuccess) return "unknown";
  return version >= 10000 ? fmt::format("{}.{}.{}", version / 10000, (version % 10000) / 100, version % 100)
                          : fmt::format("{}.{}.{}", version / 1000, (version % 1000) / 100, version % 100);
}

namespace detail {

inline std::string nccl_failure(ncclResult_t result, const char* call, const std::string& context, ncclComm_t comm,
                                const char* file, int line) {
  std::string last = compat::nccl_last_error(comm);
  if (!last.empty()) last = fmt::format(" ({})", last);
  return fmt::format("NCCL {} failed for {}: {}{} at {}:{}; NCCL {}", call, context, ncclGetErrorString(result), last,
                     file, line, nccl_version_string());
}

}  // namespace detail
}  // namespace multigpu

/// Checks an NCCL call; throws CommError with the call, `context` (replica
/// and device), NCCL's error text, the place and NCCL's version.
#define MULTIGPU_NCCL_CHECK(call, context, comm)                                                             \
  do {                                                                                                       \
    const ncclResult_t multigpu_nccl_status_ = (call);                                                       \
    if (multigpu_nccl_status_ != ncclSuccess) {                                                              \
      throw ::multigpu::CommError(                                                                           \
          ::multigpu::detail::nccl_failure(multigpu_nccl_status_, #call, (context), (comm), __FILE__, __LINE__)); \
    }                                                                                                        \
  } while (false)

/// The same for destructors: logs a warning instead of throwing.
#define MULTIGPU_NCCL_CHECK_NOTHROW(call, context, comm)                                                          \
  do {                                                                                                            \
    const ncclResult_t multigpu_nccl_status_ = (call);                                                            \
    if (multigpu_nccl_status_ != ncclSuccess) {                                                                   \
      ::multigpu::warn(                                                                                           \
          ::multigpu::detail::nccl_failure(multigpu_nccl_status_, #call, (context), (comm), __FILE__, __LINE__)); \
    }                                                                                                             \
  } while (false)

namespace multigpu {

/// Where this process's GPUs sit in a communicator that spans processes:
/// NCCL ranks first_rank .. first_rank + (local GPUs) - 1 of `ranks`, all
/// joined by the same unique id (made by one process, passed to the others).
struct NcclWorld {
  /// The communicator's unique id, the same in every process.
  ncclUniqueId id{};
  /// NCCL ranks in the communicator: every GPU of every process.
  int ranks = 0;
  /// The NCCL rank of this process's first GPU.
  int first_rank = 0;
};

/// The NcclWorld of a job over several processes: rank 0 makes the unique
/// id and every process receives it through `processes`. Collective.
inline NcclWorld agree_on_nccl_world(ProcessCollectives& processes, std::size_t first_rank, std::size_t ranks) {
  NcclWorld world;
  if (processes.rank() == 0) MULTIGPU_NCCL_CHECK(ncclGetUniqueId(&world.id), "rank 0", nullptr);
  const std::string id_text =
      processes.all_gather_text(std::string(reinterpret_cast<const char*>(&world.id), sizeof(world.id)))[0];
  std::copy(id_text.begin(), id_text.end(), reinterpret_cast<char*>(&world.id));
  world.ranks = static_cast<int>(ranks);
  world.first_rank = static_cast<int>(first_rank);
  return world;
}

// Note [NCCL watchdog]
// ~~~~~~~~~~~~~~~~~~~~
// Nothing on the host waits for a collective to finish (Note [Streams]). A
// collective that never finishes (a GPU or a peer process gone, processes
// that issued different collectives) would leave the streams blocked, and
// the program with them at the next value it reads. So, as ProcessGroupNCCL
// does, every collective leaves behind one completion event per GPU and a
// deadline, and a watchdog thread looks, every few milliseconds, at the
// oldest unfinished one and at NCCL's asynchronous errors. On an error or a
// missed deadline it aborts every communicator (ncclCommAbort ends their
// kernels, so the streams move on with whatever the buffers hold) and
// records why; the next collective, wait() or the next training step
// throws CommError with that reason. The set-up has a deadline too:
// communicators are made non-blocking (NCCL >= 2.14) and polled, and a few
// all-reduces at construction, from one element to a bucket's size, make
// NCCL connect the GPUs for the algorithms the training's buckets will use
// (it connects lazily: Note [NCCL and cudaFree]) and check the sums, so
// that a broken interconnect fails here with a clear message and not in the
// middle of the first step. Every call restores the caller's current device.

// Note [NCCL watchdog and CUDA graphs]
// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
// While a stream is captured into a CUDA graph in the default (global)
// capture mode, a call that might synchronise, such as cudaEventQuery, made
// by any thread of the process invalidates the capture. The watchdog
// queries events every 10 ms for as long as the communicator lives, so a
// user capturing a model into an at::cuda::CUDAGraph on any thread while a
// DataParallel with NCCL exists would fail now and then, at random. As
// ProcessGroupNCCL does (pytorch #148594, #160398), the watchdog thread
// switches its own capture mode to thread-local
// (detail::ThreadLocalCaptureMode, cudaThreadExchangeStreamCaptureMode):
// its queries are then checked only against captures begun on the
// watchdog's own thread, of which there are none. Before that exchange, its
// first CUDA call, the watchdog makes the first replica's GPU current: a
// new thread's current device is GPU 0, and a runtime call there (the
// exchange, an event query) would create a context on GPU 0, about half a
// GiB, in every process of a job whose processes each see all GPUs (pytorch
// #135273 and torchcomms #777 mend the same). wait() too makes the first
// replica's GPU current, then switches to the thread-local mode around its
// queries, for a communicator destroyed (or waited for) on another thread,
// maybe a fresh one, while another thread captures; it puts the caller's
// device back only where that has a context (Note [Restoring the current
// device] in detail/cuda.hpp). Nothing else needs the mode: the
// other threads multigpu owns (a replica's worker, the reducer's launch
// threads) make CUDA calls only inside a DataParallel call, and a
// DataParallel call itself cannot be captured (docs/data-parallel.md,
// "CUDA graphs"): it launches from several threads, registers each
// collective with the watchdog on the host, and reads host-side state
// (which buckets are ready, the optimizers' step counts, a GradScaler's
// flag) that a replayed graph would not update.

/// NCCL collectives over distinct GPUs (see the file comment).
class NcclCommunicator : public Communicator {
 public:
  /// One replica per GPU; the GPUs must be distinct (NCCL refuses two ranks
  /// on one). `timeout` bounds the set-up and every collective.
  explicit NcclCommunicator(std::vector<ReplicaContext> replicas,
                            std::chrono::milliseconds timeout = std::chrono::minutes(5));
  /// The same, as part of a communicator over the GPUs of several processes
  /// (multigpu/distributed.hpp): every process calls it with the same id and
  /// ranks. Averages divide by `world.ranks`; broadcast roots are the global
  /// rank 0 .. replicas-1 of the process with first_rank 0.
  NcclCommunicator(std::vector<ReplicaContext> replicas, const NcclWorld& world,
                   std::chrono::milliseconds timeout = std::chrono::minutes(5));
  inline ~NcclCommunicator() override;
  NcclCommunicator(const NcclCommunicator&) = delete;
  NcclCommunicator& operator=(const NcclCommunicator&) = delete;

  std::string name() const override { return "nccl"; }
  std::size_t size() const override { return replicas_.size(); }
  std::size_t world_size() const override { return world_ranks_; }
  inline void all_reduce(const std::vector<at::Tensor>& tensors, ReduceOp op) override;
  inline void broadcast(const std::vector<at::Tensor>& tensors, std::size_t root) override;
  inline void wait(std::chrono::milliseconds timeout) override;
  inline std::string failure() const override;

 private:
  using Clock = std::chrono::steady_clock;
  struct Outstanding {
    std::vector<detail::EventPool::Event> done;  // per GPU; see Note [Event pool]
    Clock::time_point deadline;
    std::string what;
  };

  std::string context(std::size_t r) const {
    return fmt::format("replica {} ({})", r, replicas_[r].device().str());
  }
  void check_devices() const;
  // The first replica's GPU (-1 for none): made current around CUDA calls on callers' threads.
  int first_device() const noexcept { return replicas_.empty() ? -1 : replicas_[0].device().index(); }
  void init(const NcclWorld& world);
  void warm_up();
  std::string end_group(const char* what);
  std::string await_ready(const char* what, Clock::time_point deadline);
  [[noreturn]] void abort_and_throw(const std::string& reason);
  void stop_watchdog() noexcept;
  template <class Launch>
  void collective(const char* what, const std::vector<at::Tensor>& tensors, Launch&& launch);
  void check_usable() const;
  std::string overdue(Clock::time_point now);  // under state_mutex_
  void abort_all(const std::string& reason);   // under state_mutex_, with no launch under way (see watch())
  void watch();

  std::vector<ReplicaContext> replicas_;
  std::vector<ncclComm_t> comms_;
  std::size_t world_ranks_ = 0;
  std::size_t first_rank_ = 0;
  std::chrono::milliseconds timeout_;
  // Lock order: launch_mutex_, then state_mutex_ (the watchdog only tries
  // launch_mutex_ while holding state_mutex_).
  std::mutex launch_mutex_;          // one collective (or wait) at a time
  mutable std::mutex state_mutex_;   // what follows
  std::deque<Outstanding> outstanding_;
  std::optional<Clock::time_point> launching_until_;  // a launch under way, and its deadline
  bool aborted_ = false;
  std::string abort_reason_;
  bool stopping_ = false;
  std::condition_variable wake_;
  std::thread watchdog_;
};

namespace detail {

inline ncclDataType_t nccl_type(at::ScalarType type) {
  switch (type) {
    case at::kFloat: return ncclFloat32;
    case at::kDouble: return ncclFloat64;
    case at::kHalf: return ncclFloat16;
    case at::kInt: return ncclInt32;
    case at::kLong: return ncclInt64;
    case at::kChar: return ncclInt8;
    case at::kByte: return ncclUint8;
    case at::kBool: return ncclUint8;
    default:
      break;
  }
  ncclDataType_t bfloat16{};
  if (type == at::kBFloat16 && compat::nccl_bfloat16(bfloat16)) return bfloat16;
  throw CommError(fmt::format("NCCL {} has no type for {}", nccl_version_string(), c10::toString(type)));
}

}  // namespace detail

// ---------------------------------------------------------------------------
// Definitions

inline void NcclCommunicator::check_devices() const {
  std::vector<int> devices;
  for (std::size_t r = 0; r < replicas_.size(); ++r) {
    const auto& device = replicas_[r].device();
    if (!device.is_cuda() || !replicas_[r].stream()) {
      throw CommError(fmt::format("NCCL backend: replica {} is on {}, not a GPU", r, device.str()));
    }
    for (int seen : devices) {
      if (seen == device.index()) {
        throw CommError(fmt::format("NCCL backend: replica {} is on {}, like an earlier replica; NCCL refuses "
                                    "two ranks on one GPU, use the local backend",
                                    r, device.str()));
      }
    }
    devices.push_back(device.index());
  }
}

inline NcclCommunicator::NcclCommunicator(std::vector<ReplicaContext> replicas, std::chrono::milliseconds timeout)
    : replicas_(std::move(replicas)), timeout_(timeout) {
  check_devices();
  NcclWorld world;
  MULTIGPU_NCCL_CHECK(ncclGetUniqueId(&world.id), "this process", nullptr);
  world.ranks = static_cast<int>(replicas_.size());
  init(world);
}

inline NcclCommunicator::NcclCommunicator(std::vector<ReplicaContext> replicas, const NcclWorld& world,
                                          std::chrono::milliseconds timeout)
    : replicas_(std::move(replicas)), timeout_(timeout) {
  check_devices();
  if (world.ranks < static_cast<int>(replicas_.size()) || world.first_rank < 0 ||
      world.first_rank + static_cast<int>(replicas_.size()) > world.ranks) {
    throw CommError(fmt::format("NCCL backend: ranks {}..{} do not fit in a communicator of {}", world.first_rank,
                                world.first_rank + static_cast<int>(replicas_.size()) - 1, world.ranks));
  }
  init(world);
}

inline void NcclCommunicator::init(const NcclWorld& world) {
  if (timeout_.count() <= 0) throw CommError("NCCL backend: the time-out must be positive");
  world_ranks_ = static_cast<std::size_t>(world.ranks);
  first_rank_ = static_cast<std::size_t>(world.first_rank);
  const detail::RestoreCudaDevice restore_device;
  comms_.assign(replicas_.size(), nullptr);
  const auto deadline = Clock::now() + timeout_;
  // Not under LibTorch's free mutex: the set-up waits for the other ranks,
  // maybe for minutes. Several ranks from one thread: each init must be
  // inside one group, or the first would wait for the others forever.
  MULTIGPU_NCCL_CHECK(ncclGroupStart(), "all replicas", nullptr);
  std::string failure;
  for (std::size_t r = 0; r < replicas_.size() && failure.empty(); ++r) {
    const cudaError_t set = cudaSetDevice(replicas_[r].device().index());
    if (set != cudaSuccess) {
      cudaGetLastError();
      failure = fmt::format("cudaSetDevice failed for {}: {}", context(r), cudaGetErrorString(set));
      break;
    }
    const ncclResult_t result =
        compat::nccl_init_rank(&comms_[r], world.ranks, world.id, world.first_rank + static_cast<int>(r));
    if (result != ncclSuccess && !compat::nccl_in_progress(result)) {
      failure = detail::nccl_failure(result, "ncclCommInitRank", context(r), nullptr, __FILE__, __LINE__);
    }
  }
  const std::string ended = end_group(fmt::format("setting up NCCL ranks {}..{} of {}", world.first_rank,
                                                  world.first_rank + static_cast<int>(replicas_.size()) - 1,
                                                  world.ranks)
                                          .c_str());
  if (failure.empty()) failure = ended;
  if (failure.empty()) failure = await_ready("setting up NCCL", deadline);
  if (!failure.empty()) abort_and_throw(failure);
  watchdog_ = std::thread([this] { watch(); });
  try {
    warm_up();
  } catch (...) {
    stop_watchdog();
    std::lock_guard<std::mutex> launch(launch_mutex_);
    std::lock_guard<std::mutex> state(state_mutex_);
    abort_all("the warm-up all-reduce failed");
    throw;
  }
}

inline void NcclCommunicator::stop_watchdog() noexcept {
  if (!watchdog_.joinable()) return;
  {
    std::lock_guard<std::mutex> state(state_mutex_);
    stopping_ = true;
  }
  wake_.notify_all();
  watchdog_.join();
}

// See Note [NCCL and cudaFree] (detail/cuda.hpp), on lazy connection.
inline void NcclCommunicator::warm_up() {
  // One all-reduce per message-size range NCCL picks algorithms for, up to
  // a bucket's size, each over its own part of one buffer of ones (one
  // allocation per GPU): afterwards every element holds the number of ranks.
  static constexpr std::int64_t kElements[] = {1, std::int64_t{1} << 14, std::int64_t{1} << 18,
                                               std::int64_t{1} << 22};
  std::int64_t total = 0;
  for (const std::int64_t elements : kElements) total += elements;
  std::vector<at::Tensor> buffers;
  for (const auto& replica : replicas_) {
    buffers.push_back(at::ones({total}, at::TensorOptions().dtype(at::kFloat).device(replica.device())));
  }
  std::int64_t offset = 0;
  for (const std::int64_t elements : kElements) {
    std::vector<at::Tensor> parts;
    for (const auto& buffer : buffers) parts.push_back(buffer.narrow(0, offset, elements));
    all_reduce(parts, ReduceOp::kSum);
    offset += elements;
  }
  wait(timeout_);
  for (std::size_t r = 0; r < buffers.size(); ++r) {
    const double low = buffers[r].min().item<double>();
    const double high = buffers[r].max().item<double>();
    if (low != static_cast<double>(world_ranks_) || high != static_cast<double>(world_ranks_)) {
      throw CommError(fmt::format("NCCL's first all-reduces gave values from {} to {} on {} instead of {} (the "
                                  "number of GPUs): the GPUs cannot exchange data correctly; NCCL_DEBUG=INFO shows "
                                  "how NCCL connected them",
                                  low, high, context(r), world_ranks_));
    }
  }
}

// ncclGroupEnd; returns "" or what went wrong.
inline std::string NcclCommunicator::end_group(const char* what) {
  const ncclResult_t ended = ncclGroupEnd();
  if (ended == ncclSuccess || compat::nccl_in_progress(ended)) return "";
  return detail::nccl_failure(ended, "ncclGroupEnd", what, nullptr, __FILE__, __LINE__);
}

// With non-blocking communicators, polls each until its last call has taken
// effect (ncclInProgress no more: the set-up done, or the kernels enqueued,
// not finished). Returns "" or what went wrong. Called with launch_mutex_
// held, so the watchdog cannot abort the communicators meanwhile.
inline std::string NcclCommunicator::await_ready(const char* what, Clock::time_point deadline) {
  if (!compat::kNcclNonBlocking) return "";
  for (std::size_t r = 0; r < comms_.size(); ++r) {
    if (comms_[r] == nullptr) continue;
    while (true) {
      ncclResult_t state = ncclSuccess;
      const ncclResult_t queried = ncclCommGetAsyncError(comms_[r], &state);
      if (queried != ncclSuccess) state = queried;
      if (state == ncclSuccess) break;
      if (!compat::nccl_in_progress(state)) {
        return detail::nccl_failure(state, what, context(r), comms_[r], __FILE__, __LINE__);
      }
      if (Clock::now() >= deadline) {
        return fmt::format("{}: NCCL was still busy after {} ms on {}; NCCL {}", what, timeout_.count(), context(r),
                           nccl_version_string());
      }
      std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
  }
  return "";
}

// Called with launch_mutex_ held (or before the watchdog exists).
inline void NcclCommunicator::abort_and_throw(const std::string& reason) {
  {
    std::lock_guard<std::mutex> state(state_mutex_);
    abort_all(reason);
  }
  throw CommError(reason + "; the communicator was aborted");
}

inline void NcclCommunicator::check_usable() const {
  std::lock_guard<std::mutex> state(state_mutex_);
  if (aborted_) {
    throw CommError(fmt::format("the NCCL communicator was aborted after an earlier failure ({}); build a new "
                                "DataParallel (or communicator) to go on",
                                abort_reason_));
  }
}

inline std::string NcclCommunicator::failure() const {
  std::lock_guard<std::mutex> state(state_mutex_);
  return aborted_ ? abort_reason_ : std::string();
}

// A tensor NCCL can use in place is dense; a dense one that is not
// contiguous (channels-last) is used as its memory, in memory order, when
// every replica lays it out alike. Anything else goes through a contiguous
// copy on the same stream, copied back after the collective (the copy is
// used on that stream only). LibTorch's free mutex is held from group start
// to group end only (see Note [NCCL and cudaFree]).
template <class Launch>
void NcclCommunicator::collective(const char* what, const std::vector<at::Tensor>& tensors, Launch&& launch) {
  detail::check_collective_tensors(tensors, replicas_, what);
  const ncclDataType_t type = detail::nccl_type(tensors[0].scalar_type());
  bool same_layout = true;
  for (const auto& t : tensors) same_layout = same_layout && t.strides() == tensors[0].strides();
  std::vector<at::Tensor> io(tensors.size());
  {
    const compat::NoGradGuard no_grad;
    for (std::size_t r = 0; r < tensors.size(); ++r) {
      const at::Tensor& t = tensors[r];
      io[r] = t.is_contiguous() || (same_layout && t.is_non_overlapping_and_dense()) ? t : t.contiguous();
    }
  }
  // See Note [Restoring the current device] (detail/cuda.hpp): NCCL restores this one after the group.
  const detail::RestoreCudaDevice restore_device(first_device());
  std::lock_guard<std::mutex> launching(launch_mutex_);
  check_usable();
  const auto deadline = Clock::now() + timeout_;
  {
    std::lock_guard<std::mutex> state(state_mutex_);
    launching_until_ = deadline;
  }
  std::string failure;
  {
    std::lock_guard<std::mutex> free_lock(detail::cuda_free_mutex());  // See Note [NCCL and cudaFree]
    MULTIGPU_NCCL_CHECK(ncclGroupStart(), what, nullptr);
    for (std::size_t r = 0; r < io.size() && failure.empty(); ++r) {
      const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(replicas_[r].device().index()).stream();
      const ncclResult_t result =
          launch(io[r].data_ptr(), static_cast<std::size_t>(io[r].numel()), type, comms_[r], stream);
      if (result != ncclSuccess && !compat::nccl_in_progress(result)) {
        failure = detail::nccl_failure(result, what, context(r), comms_[r], __FILE__, __LINE__);
      }
    }
    const std::string ended = end_group(what);
    if (failure.empty()) failure = ended;
  }
  if (failure.empty()) failure = await_ready(what, deadline);
  if (!failure.empty()) abort_and_throw(failure);
  Outstanding work;
  work.deadline = deadline;
  work.what = what;
  for (std::size_t r = 0; r < io.size(); ++r) {
    if (!io[r].is_same(tensors[r])) {
      const compat::NoGradGuard no_grad;
      tensors[r].copy_(io[r]);
    }
    const c10::Stream stream = *detail::current_stream(replicas_[r].device());
    work.done.push_back(detail::pooled_event(stream.device()));
    work.done.back()->record(stream);
  }
  std::lock_guard<std::mutex> state(state_mutex_);
  launching_until_.reset();
  outstanding_.push_back(std::move(work));
}

inline void NcclCommunicator::all_reduce(const std::vector<at::Tensor>& tensors, ReduceOp op) {
  const bool average = op == ReduceOp::kAverage;
  const ncclRedOp_t nccl_op = average ? compat::nccl_average_op() : ncclSum;
  collective("NCCL all-reduce", tensors,
             [&](void* data, std::size_t count, ncclDataType_t type, ncclComm_t comm, cudaStream_t stream) {
               return ncclAllReduce(data, data, count, type, nccl_op, comm, stream);
             });
  if (average && !compat::kNcclHasAverage) {
    const compat::NoGradGuard no_grad;
    for (const auto& t : tensors) t.div_(static_cast<double>(world_ranks_));
  }
}

inline void NcclCommunicator::broadcast(const std::vector<at::Tensor>& tensors, std::size_t root) {
  if (root >= tensors.size()) throw CommError(fmt::format("NCCL broadcast: root {} is not a replica", root));
  collective("NCCL broadcast", tensors,
             [&](void* data, std::size_t count, ncclDataType_t type, ncclComm_t comm, cudaStream_t stream) {
               return ncclBroadcast(data, data, count, type, static_cast<int>(root), comm, stream);
             });
}

// Drops finished collectives; returns why the communicators must be aborted
// (an NCCL error, a missed deadline), or "".
inline std::string NcclCommunicator::overdue(Clock::time_point now) {
  if (aborted_) return "";
  while (!outstanding_.empty()) {
    bool finished = true;
    for (const auto& event : outstanding_.front().done) finished = finished && event->query();
    if (!finished) break;
    outstanding_.pop_front();
  }
  for (std::size_t r = 0; r < comms_.size(); ++r) {
    ncclResult_t state = ncclSuccess;
    if (ncclCommGetAsyncError(comms_[r], &state) != ncclSuccess) continue;
    if (state != ncclSuccess && !compat::nccl_in_progress(state)) {
      return detail::nccl_failure(state, "a collective", context(r), comms_[r], __FILE__, __LINE__);
    }
  }
  if (!outstanding_.empty() && now >= outstanding_.front().deadline) {
    const Outstanding& late = outstanding_.front();
    std::size_t stuck = 0;
    while (stuck + 1 < late.done.size() && late.done[stuck]->query()) ++stuck;
    return fmt::format("{} did not finish within {} ms; {} had not finished", late.what, timeout_.count(),
                       context(stuck));
  }
  if (launching_until_ && now >= *launching_until_) {
    return fmt::format("launching an NCCL collective took longer than {} ms", timeout_.count());
  }
  return "";
}

inline void NcclCommunicator::abort_all(const std::string& reason) {
  if (aborted_) return;
  aborted_ = true;
  abort_reason_ = reason;
  warn(fmt::format("aborting the NCCL communicator: {}", reason));
  for (std::size_t r = 0; r < comms_.size(); ++r) {
    if (comms_[r] != nullptr) MULTIGPU_NCCL_CHECK_NOTHROW(ncclCommAbort(comms_[r]), context(r), nullptr);
  }
  outstanding_.clear();
}

// The watchdog aborts only when no launch is under way (a launch polls its
// own deadline), except a launch blocked past its deadline inside a
// blocking NCCL (< 2.14), which only ncclCommAbort from another thread ends.
inline void NcclCommunicator::watch() {
  // See Note [NCCL watchdog and CUDA graphs]: the device first, then the mode.
  if (first_device() >= 0 && cudaSetDevice(first_device()) != cudaSuccess) cudaGetLastError();
  const detail::ThreadLocalCaptureMode capture_mode;
  if (!capture_mode.active()) {
    warn("the NCCL watchdog could not set its CUDA stream capture mode to thread-local: its event queries may "
         "invalidate CUDA graph captures made on other threads");
  }
  std::unique_lock<std::mutex> state(state_mutex_);
  while (!stopping_) {
    wake_.wait_for(state, std::chrono::milliseconds(10));
    if (stopping_) break;
    try {
      const auto now = Clock::now();
      const std::string reason = overdue(now);
      if (reason.empty()) continue;
      std::unique_lock<std::mutex> launching(launch_mutex_, std::try_to_lock);
      const bool blocked_launch = !compat::kNcclNonBlocking && launching_until_ && now >= *launching_until_;
      if (launching.owns_lock() || blocked_launch) abort_all(reason);
    } catch (const std::exception& e) {
      warn(fmt::format("the NCCL watchdog failed: {}", e.what()));
    }
  }
}

inline void NcclCommunicator::wait(std::chrono::milliseconds timeout) {
  // The event queries, and the mode exchange, with a GPU of the events current: on a thread that had none, they
  // would create a context on GPU 0 (Note [Restoring the current device] in detail/cuda.hpp).
  const detail::RestoreCudaDevice restore_device(first_device());
  const detail::ThreadLocalCaptureMode capture_mode;  // See Note [NCCL watchdog and CUDA graphs]
  std::lock_guard<std::mutex> launching(launch_mutex_);
  const auto start = Clock::now();
  while (true) {
    {
      std::lock_guard<std::mutex> state(state_mutex_);
      const auto now = Clock::now();
      std::string reason = overdue(now);
      if (reason.empty() && !outstanding_.empty() && now - start >= timeout) {
        reason = fmt::format("waiting for {} took longer than {} ms", outstanding_.front().what, timeout.count());
      }
      if (!reason.empty()) abort_all(reason);
      if (aborted_) {
        throw CommError(fmt::format("the NCCL communicator was aborted ({})", abort_reason_));
      }
      if (outstanding_.empty()) return;
    }
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
}

// Waits (up to the time-out) for what is still running, then finalizes and
// destroys the communicators; aborts them instead when they do not finish.
inline NcclCommunicator::~NcclCommunicator() {
  stop_watchdog();
  try {
    wait(timeout_);
  } catch (const std::exception&) {
    return;  // aborted (ncclCommAbort released them); the reason was logged
  }
  const detail::RestoreCudaDevice restore_device(first_device());  // as in collective()
  std::lock_guard<std::mutex> launching(launch_mutex_);
  for (std::size_t r = 0; r < comms_.size(); ++r) {
    if (comms_[r] == nullptr) continue;
    const ncclResult_t result = compat::nccl_finalize(comms_[r]);
    if (result != ncclSuccess && !compat::nccl_in_progress(result)) {
      warn(detail::nccl_failure(result, "ncclCommFinalize", context(r), comms_[r], __FILE__, __LINE__));
    }
  }
  const std::string failure = await_ready("finalizing NCCL", Clock::now() + timeout_);
  std::lock_guard<std::mutex> state(state_mutex_);
  if (!failure.empty()) {
    abort_all(failure);
    return;
  }
  for (std::size_t r = 0; r < comms_.size(); ++r) {
    if (comms_[r] != nullptr) MULTIGPU_NCCL_CHECK_NOTHROW(ncclCommDestroy(comms_[r]), context(r), nullptr);
  }
}

}  // namespace multigpu

#endif  // MULTIGPU_WITH_NCCL
