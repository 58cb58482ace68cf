#pragma once
// CUDA helpers: the one checking macro for CUDA runtime calls, and the
// caching allocator's free mutex. Compiled only with MULTIGPU_WITH_CUDA.

#include "multigpu/config.hpp"

#if MULTIGPU_WITH_CUDA

#include <mutex>
#include <string>

#include <cuda_runtime_api.h>
#include <fmt/core.h>

#include "multigpu/detail/compat.hpp"
#include "multigpu/error.hpp"

/// Throws multigpu::Error naming the call, `context` (e.g. "replica 1 (cuda:1)"),
/// the CUDA error and the place, when a CUDA runtime call fails.
#define MULTIGPU_CUDA_CHECK(call, context)                                                                 \
  do {                                                                                                     \
    const cudaError_t multigpu_cuda_status_ = (call);                                                      \
    if (multigpu_cuda_status_ != cudaSuccess) {                                                            \
      ::cudaGetLastError();                                                                                \
      throw ::multigpu::Error(::fmt::format("{} failed for {}: {} ({}) at {}:{}", #call, (context),        \
                                            ::cudaGetErrorString(multigpu_cuda_status_),                   \
                                            static_cast<int>(multigpu_cuda_status_), __FILE__, __LINE__)); \
    }                                                                                                      \
  } while (false)

namespace multigpu {
namespace detail {

/// Note [NCCL and cudaFree]
/// ~~~~~~~~~~~~~~~~~~~~~~~~
/// cudaFree synchronises the device. If one thread frees device memory (the
/// caching allocator does when it runs short and releases its cache) while
/// another is between ncclGroupStart and ncclGroupEnd for several GPUs, the
/// two can wait on each other forever. LibTorch guards its own cudaFree calls
/// with one mutex; every NCCL launch in multigpu holds the same mutex, and
/// multigpu itself never frees device memory while a collective is in flight
/// (its gradient buckets are allocated once, at construction).
inline std::mutex& cuda_free_mutex() { return compat::cuda_free_mutex(); }

}  // namespace detail
}  // namespace multigpu

#endif  // MULTIGPU_WITH_CUDA
