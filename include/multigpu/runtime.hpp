#pragma once
/// @file
/// The runtime policy of BasicDeviceManager: what it asks the machine, and the
/// real answer (SystemRuntime: the CUDA runtime and NVML). A scripted fake for
/// tests lives in multigpu/testing/fake_runtime.hpp.
///
/// A runtime policy is any copyable class with these members:
///
///   RuntimeInfo info();                          // versions, NVML, why no GPU
///   std::vector<RuntimeGpu> visible_gpus();      // CUDA's view, logical order, fresh memory
///   std::optional<std::string> getenv(const char* name) const;
///   std::optional<bool> can_access_peer(int from, int to);  // logical numbers; nullopt: unknown
///   static constexpr bool kRealDevices;          // optional (default true): its GPUs are CUDA's
///   void release_cached_memory();                // optional: give back the memory LibTorch's
///                                                // caching allocator holds, on every GPU

#include <cstdint>
#include <cstdlib>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <fmt/core.h>
#include <torch/version.h>

#include "multigpu/config.hpp"
#include "multigpu/detail/nvml.hpp"

#if MULTIGPU_WITH_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#include <cuda_runtime_api.h>
#endif
#if MULTIGPU_WITH_NCCL
#include <nccl.h>
#endif

namespace multigpu {

/// One GPU as a runtime reports it.
struct RuntimeGpu {
  /// The GPU's name ("NVIDIA A40").
  std::string name;
  std::string pci_bus_id;  ///< "0000:3b:00.0"; "" when unknown
  std::string uuid;        ///< "GPU-..."; "" when unknown
  int cc_major = 0;        ///< Compute capability.
  /// Compute capability, minor.
  int cc_minor = 0;
  std::int64_t total_bytes = -1;  ///< -1 when unknown
  /// Memory in use by every process; -1 when unknown. Without the memory the
  /// driver reserves for itself unless memory_query is NVML's v1 query. See
  /// Note [Reserved memory] in detail/nvml.hpp.
  std::int64_t used_bytes = -1;
  std::int64_t reserved_bytes = -1;  ///< Reserved by the driver; -1 when unknown (or counted in used_bytes)
  /// What used_bytes came from: "nvmlDeviceGetMemoryInfo_v2",
  /// "nvmlDeviceGetMemoryInfo" (v1: reserved memory counted as used),
  /// "cudaMemGetInfo", or "" when unknown.
  std::string memory_query;
  int nvml_index = -1;  ///< nvidia-smi's number for it; -1 when unknown
  /// The compute processes on it and their memory; nullopt when unknown
  /// (no NVML). See Note [Which process uses a GPU] in detail/nvml.hpp.
  std::optional<std::vector<GpuProcess>> processes;
};

/// What a runtime knows about the machine as a whole.
struct RuntimeInfo {
  /// LibTorch's version.
  std::string torch_version = TORCH_VERSION;
  /// LibTorch was built with CUDA and multigpu compiled its CUDA paths.
  bool cuda_build = false;
  std::string cuda_runtime_version;  ///< "12.4"; "" without CUDA
  std::string driver_version;        ///< NVIDIA driver; "" when unknown
  std::string nccl_version;          ///< "2.21.5"; "" when the NCCL backend is not compiled
  /// Where memory figures come from: "NVML", "cudaMemGetInfo", "fake" or "none".
  std::string memory_source = "none";
  /// Why NVML is not used ("" when it is).
  std::string nvml_problem;
  /// Every GPU of the machine as NVML sees it, CUDA_VISIBLE_DEVICES or not;
  /// empty without NVML. Lets the report say "4 GPUs here, LibTorch CPU-only".
  std::vector<RuntimeGpu> machine_gpus;
  /// The CUDA runtime's complaint when it finds no device ("" otherwise).
  std::string cuda_error;
};

/// The real machine: the CUDA runtime (with MULTIGPU_WITH_CUDA) for the
/// GPUs that this process can use, NVML for memory without creating CUDA
/// contexts, the process environment for CUDA_VISIBLE_DEVICES.
class SystemRuntime {
 public:
  /// Its GPUs are CUDA's (see the runtime policy above).
  static constexpr bool kRealDevices = true;
  /// LibTorch, CUDA, driver, NVML and NCCL, and the machine's GPUs.
  RuntimeInfo info();
  /// The GPUs this process can use, in logical order, with their memory.
  std::vector<RuntimeGpu> visible_gpus();
  /// An environment variable; nullopt when not set.
  std::optional<std::string> getenv(const char* name) const {
    const char* value = std::getenv(name);
    return value == nullptr ? std::nullopt : std::optional<std::string>(value);
  }
  /// Whether GPU `from` can read GPU `to`'s memory; nullopt when unknown.
  std::optional<bool> can_access_peer(int from, int to);
  /// Empties LibTorch's CUDA caching allocator (every GPU of this process).
  void release_cached_memory();

 private:
  std::string cuda_error_;
  bool used_context_memory_ = false;
};

namespace detail {

/// "13.0" from CUDA's integer version (13000); "" for 0.
inline std::string cuda_version_text(int version) {
  return version <= 0 ? std::string() : fmt::format("{}.{}", version / 1000, (version % 1000) / 10);
}

/// Why a CUDA build of LibTorch sees no GPU, in words a user can act on, from
/// what cudaGetDeviceCount returned (`status`, `status_text`), the CUDA
/// version LibTorch was built with (`runtime_version`, 13000 for 13.0) and the
/// newest CUDA the installed driver supports (`driver_version`; 0: no driver
/// could be loaded). CUDA's own codes: 35 cudaErrorInsufficientDriver,
/// 100 cudaErrorNoDevice, 999 cudaErrorUnknown.
inline std::string explain_cuda_failure(int status, const std::string& status_text, int runtime_version,
                                        int driver_version, const std::string& driver_name) {
  const std::string built = cuda_version_text(runtime_version);
  const std::string driver = driver_name.empty() ? std::string("the NVIDIA driver") : fmt::format("NVIDIA driver {}", driver_name);
  if (status == 35 && driver_version <= 0) {
    return fmt::format("LibTorch was built with CUDA {}, but no NVIDIA driver was found (libcuda.so.1 could not be "
                       "loaded), so no GPU can be used: install the NVIDIA driver, or run on the CPU with \"cpu\"",
                       built.empty() ? "(unknown version)" : built);
  }
  if (status == 35 || (driver_version > 0 && runtime_version > driver_version)) {
    return fmt::format("{} supports CUDA up to {}, but this LibTorch was built with CUDA {}: update the driver to one "
                       "for CUDA {} or newer, or build against a LibTorch for CUDA {} or older",
                       driver, cuda_version_text(driver_version), built, built, cuda_version_text(driver_version));
  }
  if (status == 100) {
    return fmt::format("{} is installed, but it finds no NVIDIA GPU (cudaGetDeviceCount: {})", driver, status_text);
  }
  return fmt::format("cudaGetDeviceCount: {} (CUDA error {})", status_text, status);
}

/// Runtime::kRealDevices where the policy declares it, else true.
template <class Runtime, class = void>
struct real_devices_of : std::true_type {};
template <class Runtime>
struct real_devices_of<Runtime, std::void_t<decltype(Runtime::kRealDevices)>>
    : std::integral_constant<bool, Runtime::kRealDevices> {};
template <class Runtime>
constexpr bool runtime_has_real_devices() {
  return real_devices_of<Runtime>::value;
}

template <class Runtime, class = void>
struct has_release_cached_memory : std::false_type {};
template <class Runtime>
struct has_release_cached_memory<Runtime, std::void_t<decltype(std::declval<Runtime&>().release_cached_memory())>>
    : std::true_type {};

/// Calls runtime.release_cached_memory() where the policy has it.
template <class Runtime>
void release_cached_memory(Runtime& runtime) {
  if constexpr (has_release_cached_memory<Runtime>::value) runtime.release_cached_memory();
}

inline RuntimeGpu from_nvml(const NvmlGpu& gpu) {
  RuntimeGpu out;
  out.name = gpu.name;
  out.pci_bus_id = gpu.pci_bus_id;
  out.uuid = gpu.uuid;
  out.cc_major = gpu.cc_major;
  out.cc_minor = gpu.cc_minor;
  out.total_bytes = gpu.memory.total_bytes;
  out.used_bytes = gpu.memory.in_use_bytes;
  out.reserved_bytes = gpu.memory.reserved_bytes;
  out.memory_query = gpu.memory.query;
  out.nvml_index = gpu.index;
  out.processes = gpu.processes;
  return out;
}

}  // namespace detail

// ---------------------------------------------------------------------------
// Definitions

inline RuntimeInfo SystemRuntime::info() {
  RuntimeInfo info;
  const auto& nvml = detail::Nvml::instance();
  info.nvml_problem = nvml.unavailable_reason();
  info.driver_version = nvml.driver_version();
  for (const auto& gpu : nvml.gpus()) info.machine_gpus.push_back(detail::from_nvml(gpu));
#if MULTIGPU_WITH_CUDA
  info.cuda_build = true;
  int runtime_version = 0;
  if (cudaRuntimeGetVersion(&runtime_version) == cudaSuccess) {
    info.cuda_runtime_version = detail::cuda_version_text(runtime_version);
  }
  if (info.driver_version.empty()) {
    int driver = 0;
    if (cudaDriverGetVersion(&driver) == cudaSuccess && driver > 0) {
      info.driver_version = fmt::format("CUDA {}", detail::cuda_version_text(driver));
    }
  }
  if (cuda_error_.empty()) visible_gpus();  // fills cuda_error_ when CUDA finds nothing
  info.cuda_error = cuda_error_;
#endif
#if MULTIGPU_WITH_NCCL
  int nccl = 0;
  if (ncclGetVersion(&nccl) == ncclSuccess) {
    // NCCL >= 2.9 encodes major*10000 + minor*100 + patch; older ones major*1000 + ...
    info.nccl_version = nccl >= 10000
                            ? fmt::format("{}.{}.{}", nccl / 10000, (nccl % 10000) / 100, nccl % 100)
                            : fmt::format("{}.{}.{}", nccl / 1000, (nccl % 1000) / 100, nccl % 100);
  }
#endif
  info.memory_source = nvml.available() ? "NVML" : (used_context_memory_ ? "cudaMemGetInfo" : "none");
  return info;
}

inline std::vector<RuntimeGpu> SystemRuntime::visible_gpus() {
  std::vector<RuntimeGpu> gpus;
#if MULTIGPU_WITH_CUDA
  int count = 0;
  const cudaError_t status = cudaGetDeviceCount(&count);
  if (status != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error so later CUDA calls start clean
    int runtime_version = 0;
    int driver_version = 0;
    cudaRuntimeGetVersion(&runtime_version);
    cudaDriverGetVersion(&driver_version);
    cudaGetLastError();
    cuda_error_ = detail::explain_cuda_failure(static_cast<int>(status), cudaGetErrorString(status), runtime_version,
                                               driver_version, detail::Nvml::instance().driver_version());
    return gpus;
  }
  cuda_error_.clear();
  const auto nvml_gpus = detail::Nvml::instance().gpus();
  for (int i = 0; i < count; ++i) {
    cudaDeviceProp prop{};
    if (cudaGetDeviceProperties(&prop, i) != cudaSuccess) {
      cudaGetLastError();
      RuntimeGpu unknown;
      unknown.name = "(cudaGetDeviceProperties failed)";
      gpus.push_back(unknown);
      continue;
    }
    RuntimeGpu gpu;
    gpu.name = prop.name;
    gpu.cc_major = prop.major;
    gpu.cc_minor = prop.minor;
    gpu.total_bytes = static_cast<std::int64_t>(prop.totalGlobalMem);
    gpu.pci_bus_id = detail::format_pci_bus_id(static_cast<unsigned>(prop.pciDomainID),
                                               static_cast<unsigned>(prop.pciBusID),
                                               static_cast<unsigned>(prop.pciDeviceID));
    const auto* b = reinterpret_cast<const unsigned char*>(prop.uuid.bytes);
    gpu.uuid = fmt::format(
        "GPU-{:02x}{:02x}{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
        b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]);
    bool from_nvml = false;
    for (const auto& known : nvml_gpus) {
      if (known.pci_bus_id == gpu.pci_bus_id) {
        gpu.nvml_index = known.index;
        gpu.used_bytes = known.memory.in_use_bytes;
        gpu.reserved_bytes = known.memory.reserved_bytes;
        gpu.memory_query = known.memory.query;
        gpu.processes = known.processes;
        from_nvml = true;
        break;
      }
    }
    if (!from_nvml) {
      // Without NVML the only way to read memory in use is through a context
      // on that GPU. See Note [Why NVML] in detail/nvml.hpp.
      int previous = 0;
      cudaGetDevice(&previous);
      std::size_t free_bytes = 0;
      std::size_t total_bytes = 0;
      if (cudaSetDevice(i) == cudaSuccess && cudaMemGetInfo(&free_bytes, &total_bytes) == cudaSuccess) {
        gpu.used_bytes = static_cast<std::int64_t>(total_bytes - free_bytes);
        gpu.memory_query = "cudaMemGetInfo";
        used_context_memory_ = true;
      } else {
        cudaGetLastError();
      }
      cudaSetDevice(previous);
    }
    gpus.push_back(std::move(gpu));
  }
#endif
  return gpus;
}

inline std::optional<bool> SystemRuntime::can_access_peer(int from, int to) {
#if MULTIGPU_WITH_CUDA
  int can = 0;
  if (cudaDeviceCanAccessPeer(&can, from, to) != cudaSuccess) {
    cudaGetLastError();
    return std::nullopt;
  }
  return can != 0;
#else
  (void)from;
  (void)to;
  return std::nullopt;
#endif
}

inline void SystemRuntime::release_cached_memory() {
#if MULTIGPU_WITH_CUDA
  c10::cuda::CUDACachingAllocator::emptyCache();
#endif
}

}  // namespace multigpu
