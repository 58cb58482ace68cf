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

// Note [NCCL and cudaFree]
// ~~~~~~~~~~~~~~~~~~~~~~~~
// cudaFree synchronises the device. A cudaFree in one thread while another
// thread is between ncclGroupStart and ncclGroupEnd for several GPUs can
// leave both waiting for each other forever. What is guarded, and how:
// - cuda_free_mutex() is the mutex LibTorch keeps for this
//   (c10::cuda::getFreeMutex(); the caching allocator's before 2.0), and
//   multigpu's NCCL launches (nccl/communicator.hpp) hold it from group start
//   to group end. It keeps out only the cudaFree calls made under it: in the
//   LibTorch versions multigpu supports, the cudaFree(nullptr) with which
//   LibTorch creates a context for its runtime-compiled kernels. LibTorch's
//   caching allocator calls cudaFree without it (early 1.x releases took it)
//   when it releases cached blocks: on emptyCache(), and when a cudaMalloc
//   fails and it frees its cache to retry.
// - emptyCache() releases the cached blocks of every GPU of the process, so
//   the scheduler calls it only when no other in-process task still runs
//   (see Note [Emptying the cache between tasks] in scheduler/core.hpp), and
//   nothing else in multigpu calls it.
// - Not guarded: the allocator's own release when a cudaMalloc fails (an
//   allocation that runs out of memory while another thread launches a
//   collective) and cudaFree in the user's code.
inline std::mutex& cuda_free_mutex() { return compat::cuda_free_mutex(); }

}  // namespace detail
}  // namespace multigpu

#endif  // MULTIGPU_WITH_CUDA
