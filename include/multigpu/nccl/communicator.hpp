#pragma once
/// @file
/// The in-process NCCL backend: one communicator per GPU from
/// ncclCommInitAll, collectives grouped with ncclGroupStart/End on the
/// replicas' own streams. Compiled only with MULTIGPU_WITH_NCCL.
///
/// Collectives return once enqueued; wait() polls for completion and for
/// NCCL's asynchronous errors, and after a time-out or an error aborts the
/// communicators (ncclCommAbort) instead of waiting forever, so that a stuck
/// GPU becomes a CommError naming the replica. An aborted communicator stays
/// unusable: every later call throws.

#include "multigpu/config.hpp"

#if MULTIGPU_WITH_NCCL

#include <chrono>
#include <cstddef>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <ATen/ATen.h>
#include <c10/core/Event.h>
#include <c10/cuda/CUDAStream.h>
#include <fmt/core.h>
#include <nccl.h>

#include "multigpu/comm.hpp"
#include "multigpu/detail/compat.hpp"
#include "multigpu/detail/cuda.hpp"
#include "multigpu/error.hpp"
#include "multigpu/worker.hpp"

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
  ncclUniqueId id{};
  int ranks = 0;
  int first_rank = 0;
};

/// NCCL collectives over distinct GPUs of this process (see the file comment).
class NcclCommunicator : public Communicator {
 public:
  /// One replica per GPU; the GPUs must be distinct (NCCL refuses two ranks on one).
  explicit NcclCommunicator(std::vector<ReplicaContext> replicas);
  /// The same, as part of a communicator over the GPUs of several processes
  /// (multigpu/distributed.hpp): every process calls it with the same id and
  /// ranks. Averages divide by `world.ranks`; broadcast roots are the global
  /// rank 0 .. replicas-1 of the process with first_rank 0.
  NcclCommunicator(std::vector<ReplicaContext> replicas, const NcclWorld& world);
  inline ~NcclCommunicator() override;
  NcclCommunicator(const NcclCommunicator&) = delete;
  NcclCommunicator& operator=(const NcclCommunicator&) = delete;

  std::string name() const override { return "nccl"; }
  std::size_t size() const override { return replicas_.size(); }
  std::size_t world_size() const override { return world_ranks_; }
  inline void all_reduce(const std::vector<at::Tensor>& tensors, ReduceOp op) override;
  inline void broadcast(const std::vector<at::Tensor>& tensors, std::size_t root) override;
  inline void wait(std::chrono::milliseconds timeout) override;

 private:
  std::string context(std::size_t r) const {
    return fmt::format("replica {} ({})", r, replicas_[r].device().str());
  }
  cudaStream_t stream(std::size_t r) const { return c10::cuda::CUDAStream(*replicas_[r].stream()).stream(); }
  void check_usable() const;
  void record_completion();
  void abort_all();
  void check_devices() const;

  std::vector<ReplicaContext> replicas_;
  std::vector<ncclComm_t> comms_;
  std::vector<std::unique_ptr<c10::Event>> done_;  // per replica: after the last collective
  std::size_t world_ranks_ = 0;
  std::size_t first_rank_ = 0;
  bool aborted_ = false;
  std::string abort_reason_;
  mutable std::mutex mutex_;  // one collective or wait at a time
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

inline NcclCommunicator::NcclCommunicator(std::vector<ReplicaContext> replicas) : replicas_(std::move(replicas)) {
  check_devices();
  world_ranks_ = replicas_.size();
  std::vector<int> devices;
  for (const auto& replica : replicas_) devices.push_back(replica.device().index());
  comms_.assign(replicas_.size(), nullptr);
  {
    std::lock_guard<std::mutex> free_lock(detail::cuda_free_mutex());  // See Note [NCCL and cudaFree]
    MULTIGPU_NCCL_CHECK(ncclCommInitAll(comms_.data(), static_cast<int>(devices.size()), devices.data()),
                        fmt::format("{} GPUs", devices.size()), nullptr);
  }
  for (std::size_t r = 0; r < replicas_.size(); ++r) {
    done_.push_back(std::make_unique<c10::Event>(c10::DeviceType::CUDA));
  }
}

inline NcclCommunicator::NcclCommunicator(std::vector<ReplicaContext> replicas, const NcclWorld& world)
    : replicas_(std::move(replicas)) {
  check_devices();
  if (world.ranks < static_cast<int>(replicas_.size()) || world.first_rank < 0 ||
      world.first_rank + static_cast<int>(replicas_.size()) > world.ranks) {
    throw CommError(fmt::format("NCCL backend: ranks {}..{} do not fit in a communicator of {}", world.first_rank,
                                world.first_rank + static_cast<int>(replicas_.size()) - 1, world.ranks));
  }
  world_ranks_ = static_cast<std::size_t>(world.ranks);
  first_rank_ = static_cast<std::size_t>(world.first_rank);
  comms_.assign(replicas_.size(), nullptr);
  {
    std::lock_guard<std::mutex> free_lock(detail::cuda_free_mutex());  // See Note [NCCL and cudaFree]
    // Several ranks from one thread: each init must be inside one group, or
    // the first would wait for the others forever.
    MULTIGPU_NCCL_CHECK(ncclGroupStart(), "all replicas", nullptr);
    for (std::size_t r = 0; r < replicas_.size(); ++r) {
      MULTIGPU_CUDA_CHECK(cudaSetDevice(replicas_[r].device().index()), context(r));
      const ncclResult_t result =
          ncclCommInitRank(&comms_[r], world.ranks, world.id, world.first_rank + static_cast<int>(r));
      if (result != ncclSuccess) {
        ncclGroupEnd();
        throw CommError(detail::nccl_failure(result, "ncclCommInitRank", context(r), nullptr, __FILE__, __LINE__));
      }
    }
    MULTIGPU_NCCL_CHECK(ncclGroupEnd(), fmt::format("NCCL ranks {}..{} of {}", world.first_rank,
                                                    world.first_rank + static_cast<int>(replicas_.size()) - 1,
                                                    world.ranks),
                        nullptr);
  }
  for (std::size_t r = 0; r < replicas_.size(); ++r) {
    done_.push_back(std::make_unique<c10::Event>(c10::DeviceType::CUDA));
  }
}

inline NcclCommunicator::~NcclCommunicator() {
  for (std::size_t r = 0; r < comms_.size(); ++r) {
    if (comms_[r] == nullptr) continue;
    if (aborted_) continue;  // already released by ncclCommAbort
    MULTIGPU_NCCL_CHECK_NOTHROW(ncclCommDestroy(comms_[r]), context(r), nullptr);
  }
}

inline void NcclCommunicator::check_usable() const {
  if (aborted_) {
    throw CommError(fmt::format("the NCCL communicator was aborted after an earlier failure ({}); build a new "
                                "DataParallel (or communicator) to go on",
                                abort_reason_));
  }
}

inline void NcclCommunicator::record_completion() {
  for (std::size_t r = 0; r < replicas_.size(); ++r) done_[r]->record(*replicas_[r].stream());
}

inline void NcclCommunicator::all_reduce(const std::vector<at::Tensor>& tensors, ReduceOp op) {
  std::lock_guard<std::mutex> lock(mutex_);
  check_usable();
  detail::check_collective_tensors(tensors, replicas_, "NCCL all-reduce");
  const ncclDataType_t type = detail::nccl_type(tensors[0].scalar_type());
  ncclRedOp_t nccl_op = ncclSum;
  bool divide_after = false;
  if (op == ReduceOp::kAverage) {
    nccl_op = compat::nccl_average_op();
    divide_after = !compat::kNcclHasAverage;
  }
  for (const auto& t : tensors) {
    if (!t.is_contiguous()) throw CommError("NCCL all-reduce: tensors must be contiguous");
  }
  {
    std::lock_guard<std::mutex> free_lock(detail::cuda_free_mutex());  // See Note [NCCL and cudaFree]
    MULTIGPU_NCCL_CHECK(ncclGroupStart(), "all replicas", nullptr);
    for (std::size_t r = 0; r < tensors.size(); ++r) {
      void* data = tensors[r].data_ptr();
      const ncclResult_t result = ncclAllReduce(data, data, static_cast<std::size_t>(tensors[r].numel()), type,
                                                nccl_op, comms_[r], stream(r));
      if (result != ncclSuccess) {
        ncclGroupEnd();
        throw CommError(detail::nccl_failure(result, "ncclAllReduce", context(r), comms_[r], __FILE__, __LINE__));
      }
    }
    MULTIGPU_NCCL_CHECK(ncclGroupEnd(), "all replicas", nullptr);
  }
  if (divide_after) {
    for (std::size_t r = 0; r < tensors.size(); ++r) {
      const ReplicaContext::Scope scope(replicas_[r]);
      tensors[r].div_(static_cast<double>(world_ranks_));
    }
  }
  record_completion();
}

inline void NcclCommunicator::broadcast(const std::vector<at::Tensor>& tensors, std::size_t root) {
  std::lock_guard<std::mutex> lock(mutex_);
  check_usable();
  detail::check_collective_tensors(tensors, replicas_, "NCCL broadcast");
  if (root >= tensors.size()) throw CommError(fmt::format("NCCL broadcast: root {} is not a replica", root));
  const ncclDataType_t type = detail::nccl_type(tensors[0].scalar_type());
  {
    std::lock_guard<std::mutex> free_lock(detail::cuda_free_mutex());  // See Note [NCCL and cudaFree]
    MULTIGPU_NCCL_CHECK(ncclGroupStart(), "all replicas", nullptr);
    for (std::size_t r = 0; r < tensors.size(); ++r) {
      if (!tensors[r].is_contiguous()) {
        ncclGroupEnd();
        throw CommError("NCCL broadcast: tensors must be contiguous");
      }
      void* data = tensors[r].data_ptr();
      const ncclResult_t result = ncclBroadcast(data, data, static_cast<std::size_t>(tensors[r].numel()), type,
                                                static_cast<int>(root), comms_[r], stream(r));
      if (result != ncclSuccess) {
        ncclGroupEnd();
        throw CommError(detail::nccl_failure(result, "ncclBroadcast", context(r), comms_[r], __FILE__, __LINE__));
      }
    }
    MULTIGPU_NCCL_CHECK(ncclGroupEnd(), "all replicas", nullptr);
  }
  record_completion();
}

inline void NcclCommunicator::wait(std::chrono::milliseconds timeout) {
  std::lock_guard<std::mutex> lock(mutex_);
  check_usable();
  const auto start = std::chrono::steady_clock::now();
  const auto deadline = start + timeout;
  std::size_t pending = 0;
  while (true) {
    pending = replicas_.size();
    for (std::size_t r = 0; r < replicas_.size(); ++r) {
      if (done_[r]->query()) --pending;
    }
    if (pending == 0) return;
    for (std::size_t r = 0; r < comms_.size(); ++r) {
      ncclResult_t async_error = ncclSuccess;
      MULTIGPU_NCCL_CHECK(ncclCommGetAsyncError(comms_[r], &async_error), context(r), comms_[r]);
      if (async_error != ncclSuccess) {
        abort_reason_ = detail::nccl_failure(async_error, "collective", context(r), comms_[r], __FILE__, __LINE__);
        abort_all();
        throw CommError(abort_reason_ + "; the communicator was aborted");
      }
    }
    const auto now = std::chrono::steady_clock::now();
    if (now >= deadline) {
      std::size_t stuck = 0;
      while (stuck < replicas_.size() && done_[stuck]->query()) ++stuck;
      abort_reason_ = fmt::format("an NCCL collective did not complete within {} ms; {} had not finished",
                                  timeout.count(), context(stuck));
      abort_all();
      throw CommError(abort_reason_ + "; the communicator was aborted");
    }
    // Spin briefly (collectives are usually short), then back off.
    if (now - start < std::chrono::milliseconds(2)) {
      std::this_thread::yield();
    } else {
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
  }
}

inline void NcclCommunicator::abort_all() {
  aborted_ = true;
  for (std::size_t r = 0; r < comms_.size(); ++r) {
    if (comms_[r] != nullptr) MULTIGPU_NCCL_CHECK_NOTHROW(ncclCommAbort(comms_[r]), context(r), nullptr);
  }
}

}  // namespace multigpu

#endif  // MULTIGPU_WITH_NCCL
