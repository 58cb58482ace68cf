#pragma once
// Every LibTorch, NCCL and fmt difference between the versions multigpu
// supports, in one place (LibTorch 1.13 to 2.x, NCCL 2.x, fmt 9 to 12). The
// rest of the library calls these names and never tests a version itself.
//
// Note [Supported versions]
// ~~~~~~~~~~~~~~~~~~~~~~~~~
// - LibTorch: 1.13 (Debian's, CPU) to the newest 2.x. Where a signature
//   changed, a name here is deduced from the installed headers (decltype)
//   rather than from a version number, so that an unexpected minor release
//   keeps compiling; a version test is used only where the name itself moved.
// - C++: the consumer's standard decides. LibTorch up to 2.11 compiles as
//   C++17; newer LibTorch asks for C++20 (its CMake target says so) and its
//   headers use C++20 bit-field initialisers, which GCC accepts in C++17 with
//   a warning. multigpu's own code is C++17 and compiles as C++20 too.
// - fmt: 9 (Debian) to 12 (bundled inside pip's LibTorch, header-only; see
//   Note [Which fmt] in cmake/multigpuDependencies.cmake). fmt::join lives in
//   <fmt/ranges.h> from fmt 11 on, and in <fmt/format.h> before: including
//   <fmt/ranges.h> works for both.
// - NCCL: 2.7 and newer; ncclAvg and bfloat16 from 2.10, ncclGetLastError
//   from 2.13.

#include "multigpu/config.hpp"

#include <chrono>
#include <sstream>
#include <thread>
#include <type_traits>
#include <utility>

#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/Tensor.h>
#include <c10/core/Event.h>
#include <c10/core/GradMode.h>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/optim/optimizer.h>
#include <torch/serialize/input-archive.h>
#include <torch/version.h>

#if MULTIGPU_WITH_CUDA
#include <mutex>
#if TORCH_VERSION_MAJOR >= 2
#include <c10/cuda/CUDAMiscFunctions.h>
#else
#include <c10/cuda/CUDACachingAllocator.h>
#endif
#endif

#if MULTIGPU_WITH_NCCL
#include <string>

#include <nccl.h>
#endif

namespace multigpu {
namespace compat {

/// Turns autograd off for a scope (at::NoGradGuard in LibTorch 1.x only;
/// c10::NoGradGuard everywhere).
using NoGradGuard = c10::NoGradGuard;

// Note [Autocast APIs]
// ~~~~~~~~~~~~~~~~~~~~
// LibTorch 2.4 made the autocast switches take a device type
// (set_autocast_enabled(kCPU, on), set_autocast_dtype(kCUDA, dtype)) and
// deprecated the per-device names, which warn at run time from then on.
// LibTorch 1.13 to 2.3 have only those: set_enabled (CUDA),
// set_cpu_enabled, set_autocast_gpu_dtype, set_autocast_cpu_dtype. The
// name itself moved, so this is a version test. Only CPU and CUDA
// replicas exist in multigpu.
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 4)
#define MULTIGPU_DETAIL_AUTOCAST_BY_DEVICE_TYPE 1
#else
#define MULTIGPU_DETAIL_AUTOCAST_BY_DEVICE_TYPE 0
#endif

/// Whether autocast is on for `type` (kCPU or kCUDA) on this thread.
inline bool autocast_enabled(c10::DeviceType type) {
#if MULTIGPU_DETAIL_AUTOCAST_BY_DEVICE_TYPE
  return at::autocast::is_autocast_enabled(type);
#else
  return type == c10::DeviceType::CPU ? at::autocast::is_cpu_enabled() : at::autocast::is_enabled();
#endif
}

/// Turns autocast on or off for `type` (kCPU or kCUDA) on this thread.
inline void set_autocast_enabled(c10::DeviceType type, bool on) {
#if MULTIGPU_DETAIL_AUTOCAST_BY_DEVICE_TYPE
  at::autocast::set_autocast_enabled(type, on);
#else
  if (type == c10::DeviceType::CPU) {
    at::autocast::set_cpu_enabled(on);
  } else {
    at::autocast::set_enabled(on);
  }
#endif
}

/// The type autocast computes in for `type` (kCPU or kCUDA) on this thread.
inline at::ScalarType autocast_dtype(c10::DeviceType type) {
#if MULTIGPU_DETAIL_AUTOCAST_BY_DEVICE_TYPE
  return at::autocast::get_autocast_dtype(type);
#else
  return type == c10::DeviceType::CPU ? at::autocast::get_autocast_cpu_dtype()
                                      : at::autocast::get_autocast_gpu_dtype();
#endif
}

/// Sets the type autocast computes in for `type` (kCPU or kCUDA) on this thread.
inline void set_autocast_dtype(c10::DeviceType type, at::ScalarType dtype) {
#if MULTIGPU_DETAIL_AUTOCAST_BY_DEVICE_TYPE
  at::autocast::set_autocast_dtype(type, dtype);
#else
  if (type == c10::DeviceType::CPU) {
    at::autocast::set_autocast_cpu_dtype(dtype);
  } else {
    at::autocast::set_autocast_gpu_dtype(dtype);
  }
#endif
}

/// The pointer type of an autograd node as grad_accumulator() returns it:
/// std::shared_ptr<Node> up to LibTorch 2.11, c10::intrusive_ptr<Node> after.
using NodePtr = decltype(torch::autograd::impl::grad_accumulator(std::declval<const at::Tensor&>()));

namespace detail {
template <class Event>
auto wait_for_event(const Event& event, int) -> decltype(event.synchronize(), void()) {
  event.synchronize();
}
template <class Event>
void wait_for_event(const Event& event, long) {
  while (!event.query()) std::this_thread::sleep_for(std::chrono::microseconds(50));
}
}  // namespace detail

/// Blocks the host until the work recorded by `event` is done
/// (c10::Event::synchronize from LibTorch 2.0; polling before).
inline void wait_for_event(const c10::Event& event) { detail::wait_for_event(event, 0); }

/// Whether LibTorch's Gloo process group reduces bfloat16 tensors: 1.13's
/// refuses them ("Invalid scalar type"); 2.x's takes them.
inline constexpr bool kGlooHasBFloat16 = TORCH_VERSION_MAJOR >= 2;

#if MULTIGPU_WITH_CUDA
/// The mutex LibTorch holds around its own cudaFree calls. See Note [NCCL and
/// cudaFree] in detail/cuda.hpp. It moved from the caching allocator to
/// CUDAMiscFunctions in LibTorch 2.0.
inline std::mutex& cuda_free_mutex() {
#if TORCH_VERSION_MAJOR >= 2
  return *c10::cuda::getFreeMutex();
#else
  return *c10::cuda::CUDACachingAllocator::getFreeMutex();
#endif
}
#endif  // MULTIGPU_WITH_CUDA

#if MULTIGPU_WITH_NCCL
/// NCCL can average in the collective itself (ncclAvg, NCCL >= 2.10).
inline constexpr bool kNcclHasAverage = NCCL_VERSION_CODE >= NCCL_VERSION(2, 10, 0);

/// ncclAvg where NCCL has it, else ncclSum (the caller then divides).
inline ncclRedOp_t nccl_average_op() {
#if NCCL_VERSION_CODE >= NCCL_VERSION(2, 10, 0)
  return ncclAvg;
#else
  return ncclSum;
#endif
}

/// NCCL's bfloat16 type (NCCL >= 2.10); false where NCCL has none.
inline bool nccl_bfloat16(ncclDataType_t& type) {
#if NCCL_VERSION_CODE >= NCCL_VERSION(2, 10, 0)
  type = ncclBfloat16;
  return true;
#else
  (void)type;
  return false;
#endif
}

/// Whether communicators can be made non-blocking (ncclConfig_t, NCCL >= 2.14):
/// then their set-up and every group call return at once and report
/// progress through ncclCommGetAsyncError (ncclInProgress).
inline constexpr bool kNcclNonBlocking = NCCL_VERSION_CODE >= NCCL_VERSION(2, 14, 0);

/// ncclCommInitRank, non-blocking where NCCL can (see kNcclNonBlocking).
inline ncclResult_t nccl_init_rank(ncclComm_t* comm, int ranks, const ncclUniqueId& id, int rank) {
#if NCCL_VERSION_CODE >= NCCL_VERSION(2, 14, 0)
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;
  return ncclCommInitRankConfig(comm, ranks, id, rank, &config);
#else
  return ncclCommInitRank(comm, ranks, id, rank);
#endif
}

/// Whether `result` says a non-blocking call is still under way.
inline bool nccl_in_progress(ncclResult_t result) {
#if NCCL_VERSION_CODE >= NCCL_VERSION(2, 14, 0)
  return result == ncclInProgress;
#else
  (void)result;
  return false;
#endif
}

/// ncclCommFinalize where NCCL has it (2.14), so that destroying does not block.
inline ncclResult_t nccl_finalize(ncclComm_t comm) {
#if NCCL_VERSION_CODE >= NCCL_VERSION(2, 14, 0)
  return ncclCommFinalize(comm);
#else
  (void)comm;
  return ncclSuccess;
#endif
}

/// The communicator's last error in words (NCCL >= 2.13); "" where unknown.
inline std::string nccl_last_error(ncclComm_t comm) {
#if NCCL_VERSION_CODE >= NCCL_VERSION(2, 13, 0)
  if (comm == nullptr) return "";
  const char* text = ncclGetLastError(comm);
  return text == nullptr ? std::string() : std::string(text);
#else
  (void)comm;
  return "";
#endif
}
#endif  // MULTIGPU_WITH_NCCL

// Note [Parameter group options on load]
// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
// LibTorch's optimizers save every parameter group's options (learning
// rate, weight decay, ...) with their state, but before 2.0 their load()
// reads them and drops them: the groups keep the options they had, so a
// resumed run would train with the learning rates it was built with, not
// the ones of the checkpoint. After load() this reads them again, where the
// optimizer saved them ("param_groups/<i>/options"), into each group's own
// options. From 2.0 on load() restores them itself, and this does nothing.
// An optimizer that saved no such entries (a user's own class) is left as
// its load() made it.
inline void restore_param_group_options(torch::optim::Optimizer& optimizer, torch::serialize::InputArchive& archive) {
#if TORCH_VERSION_MAJOR < 2
  torch::serialize::InputArchive groups;
  if (!archive.try_read("param_groups", groups)) return;
  for (std::size_t i = 0; i < optimizer.param_groups().size(); ++i) {
    torch::serialize::InputArchive group;
    torch::serialize::InputArchive options;
    if (!groups.try_read("param_groups/" + std::to_string(i), group) || !group.try_read("options", options)) return;
    optimizer.param_groups()[i].options().serialize(options);
  }
#else
  (void)optimizer;
  (void)archive;
#endif
}

// Note [Foreach ops across versions]
// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
// A foreach op takes a list of tensors and, on CUDA, launches one fused
// kernel per chunk of the list instead of one per tensor (on the CPU it
// loops, with exactly the per-tensor op's results). LibTorch 1.13 has
// _foreach_norm and _foreach_mul_ with a host Scalar only; _foreach_copy_
// (found by its header) and _foreach_mul_ by a 0-dimensional tensor (the
// overload came in 2.1: a version test, since a Tensor converts silently to
// a one-element TensorList) came later. Where they are missing these loop,
// as the callers did before.

/// dst[i].copy_(src[i]) for every i.
inline void foreach_copy_(at::TensorList dst, at::TensorList src) {
#if __has_include(<ATen/ops/_foreach_copy.h>)
  at::_foreach_copy_(dst, src);
#else
  for (std::size_t i = 0; i < dst.size(); ++i) dst[i].copy_(src[i]);
#endif
}

/// tensors[i].mul_(factor) for every i; `factor` is a 0-dimensional tensor
/// on their device (never read on the host).
inline void foreach_mul_(at::TensorList tensors, const at::Tensor& factor) {
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 1)
  at::_foreach_mul_(tensors, factor);
#else
  for (const auto& tensor : tensors) tensor.mul_(factor);
#endif
}

/// Whether LibTorch's Optimizer::zero_grad() sets the gradients to none
/// (2.0 on; 1.13 zeroes them in place): DataParallel does what the plain
/// loop would (see Note [Zeroing gradients with one replica] and Note
/// [Gradients of parameters no backward reached]).
inline constexpr bool kZeroGradSetsToNone = TORCH_VERSION_MAJOR >= 2;

// An optimizer's state() is keyed by the parameter's TensorImpl: its address
// from LibTorch 2.0 on, the address as text before (what
// c10::guts::to_string made of it).
using OptimizerStateMap = std::decay_t<decltype(std::declval<torch::optim::Optimizer&>().state())>;

/// The key of `parameter`'s entry in an optimizer's state().
template <class Key = OptimizerStateMap::key_type>
Key optimizer_state_key(const at::Tensor& parameter) {
  if constexpr (std::is_same<Key, std::string>::value) {
    std::ostringstream text;
    text << static_cast<const void*>(parameter.unsafeGetTensorImpl());
    return text.str();
  } else {
    return parameter.unsafeGetTensorImpl();
  }
}

}  // namespace compat
}  // namespace multigpu
