#pragma once
// CUDA helpers: the one checking macro for CUDA runtime calls, the
// caching allocator's free mutex, the thread-local capture mode, the current
// device made current again. Compiled only with MULTIGPU_WITH_CUDA.

#include "multigpu/config.hpp"

#if MULTIGPU_WITH_CUDA

#include <mutex>
#include <string>

#include <ATen/detail/CUDAHooksInterface.h>
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
// - NCCL's own set-up, kept out of the training steps. Since 2.22 NCCL
//   connects the GPUs lazily by default (NCCL_RUNTIME_CONNECT=1): the
//   channels and buffers of an algorithm (ring, tree, NVLS, ...) are set up
//   by the first collective that uses it, with device allocations and, across
//   processes, a bootstrap exchange. Left to the first step, that set-up
//   would run inside a training collective: under its time-out, while the
//   model's activations hold the memory it needs, and with the allocator's
//   unguarded frees (above) free to interleave. NCCL chooses the algorithm by
//   message size, so NcclCommunicator's warm-up all-reduces, at
//   construction, 4 bytes, 64 KiB, 1 MiB and 16 MiB (the size range of
//   gradient buckets, 25 MiB by default; the largest sizes all take the
//   large-message algorithm), which connects what the buckets will use.
//   The alternative, NCCL_RUNTIME_CONNECT=0, connects every algorithm at
//   ncclCommInitRank; it is not an ncclConfig_t field (NCCL 2.30 has none)
//   but an environment variable NCCL reads once per process, so a library
//   must not set it: a user who wants every algorithm connected up front
//   (at the price of the memory for all of them) sets it before the first
//   communicator. The warm-up's buffer (17 MiB per GPU) goes back to the
//   caching allocator, where the bucket buffers reuse it.
inline std::mutex& cuda_free_mutex() { return compat::cuda_free_mutex(); }

/// While in scope, the calling thread's CUDA calls are checked against graph
/// captures begun on this thread only (cudaStreamCaptureModeThreadLocal),
/// so that a background thread's event queries do not invalidate a capture
/// another thread makes; the previous mode comes back at the end. Never
/// throws: where the exchange fails, the mode stays as it was (active() is
/// false). See Note [NCCL watchdog and CUDA graphs] in nccl/communicator.hpp.
class ThreadLocalCaptureMode {
 public:
  ThreadLocalCaptureMode() noexcept {
    active_ = cudaThreadExchangeStreamCaptureMode(&previous_) == cudaSuccess;
    if (!active_) ::cudaGetLastError();
  }
  ~ThreadLocalCaptureMode() {
    if (active_ && cudaThreadExchangeStreamCaptureMode(&previous_) != cudaSuccess) ::cudaGetLastError();
  }
  ThreadLocalCaptureMode(const ThreadLocalCaptureMode&) = delete;
  ThreadLocalCaptureMode& operator=(const ThreadLocalCaptureMode&) = delete;

  /// Whether the thread-local mode was set.
  bool active() const { return active_; }

 private:
  cudaStreamCaptureMode previous_ = cudaStreamCaptureModeThreadLocal;  // exchanged in, then back out
  bool active_ = false;
};

// Note [Restoring the current device]
// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
// Code that makes a replica's GPU current on the caller's thread (the NCCL
// communicator's set-up, collectives, wait and destructor) puts the
// caller's device back afterwards. Since CUDA 12, cudaSetDevice creates the
// primary context of the device it names when the process has none there
// (about 500 MiB of GPU memory), and a thread that never chose a device
// reports device 0 from cudaGetDevice without any context. Putting "device
// 0" back on such a thread (a user's thread in a process that uses GPU 3
// only, a destructor run on a fresh thread) would create a context on GPU 0
// in every process of a job whose processes all see every GPU. So
// RestoreCudaDevice puts the previous device back only where a primary
// context exists on it, which is also the case for a device the thread set
// itself (under CUDA 12); elsewhere the last device made current stays
// current, a GPU the code used, whose context already exists. LibTorch's
// device guards do the same (c10::cuda::MaybeSetDevice, which checks
// cuDevicePrimaryCtxGetState through hasPrimaryContext). NCCL saves and
// restores the current device itself around a group, so the device is made
// current before ncclGroupStart: NCCL then restores a device that has a
// context. Runtime calls that need a context but name no device (an event
// query, the capture-mode exchange) run where a used GPU is current for the
// same reason (see Note [NCCL watchdog and CUDA graphs] in
// nccl/communicator.hpp).

/// Remembers the calling thread's current CUDA device and, given a device
/// (>= 0), makes that one current; at the end makes the remembered device
/// current again where a context exists on it (see Note [Restoring the
/// current device]). Never throws: where `device` cannot be made current,
/// the CUDA calls that follow fail and say so.
class RestoreCudaDevice {
 public:
  explicit RestoreCudaDevice(int device = -1) noexcept {
    if (cudaGetDevice(&previous_) != cudaSuccess) {
      cudaGetLastError();
      previous_ = -1;
    }
    if (device >= 0 && device != previous_ && cudaSetDevice(device) != cudaSuccess) cudaGetLastError();
  }
  ~RestoreCudaDevice() {
    int current = -1;
    if (previous_ < 0 || (cudaGetDevice(&current) == cudaSuccess && current == previous_)) return;
    cudaGetLastError();
    bool has_context = false;
    try {
      has_context = at::detail::getCUDAHooks().hasPrimaryContext(previous_);
    } catch (...) {
      has_context = false;  // unknown: setting it could create one
    }
    if (has_context && cudaSetDevice(previous_) != cudaSuccess) cudaGetLastError();
  }
  RestoreCudaDevice(const RestoreCudaDevice&) = delete;
  RestoreCudaDevice& operator=(const RestoreCudaDevice&) = delete;

 private:
  int previous_ = -1;
};

}  // namespace detail
}  // namespace multigpu

#endif  // MULTIGPU_WITH_CUDA
