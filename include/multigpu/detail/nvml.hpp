#pragma once
// NVML, loaded at run time.
//
// Note [Why NVML]
// ~~~~~~~~~~~~~~~
// Memory queries through the CUDA runtime
// (cudaMemGetInfo) create a CUDA context on the device asked about, which
// costs a few hundred MiB on every GPU the process merely looks at, and they
// see nothing when LibTorch is CPU-only. NVML answers without a context and
// sees every GPU of the machine. It is opened with dlopen so that nothing is
// linked and a machine without the driver library still runs.
//
// Note [Reserved memory]
// ~~~~~~~~~~~~~~~~~~~~~~
// NVML's first memory query (nvmlDeviceGetMemoryInfo, "v1") counts the
// memory the driver and firmware reserve for themselves as used, so a GPU
// that runs nothing reads several hundred MiB in use: about 900 MB on an
// A100 (rust-nvml/nvml-wrapper#57: 912 MB with v1, 7.8 MB with v2, on
// idle A100s); public `nvidia-smi -q` logs of idle GPUs show "Reserved"
// 620 MiB ("Used" 4 MiB) on an A100-SXM4-40GB with driver 535, 551 MiB
// ("Used" 0 MiB) on an H100 80GB HBM3, and 328-516 MiB on other 80 GB
// Hoppers; modal-labs/gpu-glossary's nvidia-smi page shows idle H100s at
// 1MiB / 81559MiB. With the default
// busy threshold of 500 MiB, v1 would call most idle datacenter GPUs busy and
// "auto" would refuse to train. nvmlDeviceGetMemoryInfo_v2 (drivers R510 and
// later; nvidia-smi shows its figures) reports the reserved memory apart, so
// memory in use by processes is total - free - reserved. (nvml.h says that
// v2's `used` includes `reserved`, while drivers report it without;
// total - free - reserved is right either way.) Where v2 gives no answer (an
// older driver without the symbol, or NOT_SUPPORTED, FUNCTION_NOT_FOUND,
// ARGUMENT_VERSION_MISMATCH or any other error) v1 is asked, and the figures
// say which query answered, so that the device report can tell the user why
// idle GPUs may read busy. read_nvml_memory() is the one path from NVML's
// answers to "memory in use", for the real library and for
// testing::FakeRuntime alike.

#include <cstdint>
#include <functional>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include <fmt/core.h>

#include "multigpu/config.hpp"

#if MULTIGPU_WITH_NVML
#include <dlfcn.h>
#endif

namespace multigpu {

/// A process on a GPU (NVML's view): its id in the driver's PID namespace,
/// and the memory it has allocated there (-1 when NVML does not say).
struct GpuProcess {
  long pid = 0;
  std::int64_t used_bytes = -1;
};

namespace detail {

/// nvmlMemory_t, v1's answer (layout of nvml.h).
struct NvmlMemoryV1 {
  unsigned long long total = 0;
  unsigned long long free = 0;
  unsigned long long used = 0;  ///< Includes the reserved memory.
};

/// nvmlMemory_v2_t, v2's answer (layout of nvml.h; `version` is set by the caller).
struct NvmlMemoryV2 {
  unsigned int version = 0;
  unsigned long long total = 0;
  unsigned long long reserved = 0;
  unsigned long long free = 0;
  unsigned long long used = 0;
};
static_assert(sizeof(NvmlMemoryV2) == 40, "nvmlMemory_v2_t is 40 bytes in nvml.h");

/// nvml.h's nvmlMemory_v2: NVML_STRUCT_VERSION(Memory, 2), the size with the version in the top byte.
inline constexpr unsigned int kNvmlMemoryV2Version = static_cast<unsigned int>(sizeof(NvmlMemoryV2)) | (2u << 24);

/// The query names, as the device report shows them.
inline constexpr const char* kNvmlMemoryQueryV2 = "nvmlDeviceGetMemoryInfo_v2";
inline constexpr const char* kNvmlMemoryQueryV1 = "nvmlDeviceGetMemoryInfo";

/// One GPU's memory as NVML reported it. See Note [Reserved memory].
struct NvmlMemoryFigures {
  std::int64_t total_bytes = -1;     ///< -1 when NVML gave no answer
  std::int64_t in_use_bytes = -1;    ///< Allocated by processes; with v1, reserved memory too
  std::int64_t reserved_bytes = -1;  ///< For the driver and firmware; -1 with v1 (counted in in_use_bytes)
  std::string query;                 ///< kNvmlMemoryQueryV2, kNvmlMemoryQueryV1, or "" without an answer
};

/// Asks one GPU's memory the way NVML should be asked: `v2` (empty when the
/// library has no nvmlDeviceGetMemoryInfo_v2), then `v1` when v2 gives no
/// answer. Each returns NVML's status (0 for success) and fills its struct.
/// See Note [Reserved memory].
inline NvmlMemoryFigures read_nvml_memory(const std::function<int(NvmlMemoryV2&)>& v2,
                                          const std::function<int(NvmlMemoryV1&)>& v1) {
  NvmlMemoryFigures figures;
  if (v2) {
    NvmlMemoryV2 memory;
    memory.version = kNvmlMemoryV2Version;
    if (v2(memory) == 0) {
      const unsigned long long unavailable = memory.free + memory.reserved;
      figures.total_bytes = static_cast<std::int64_t>(memory.total);
      figures.reserved_bytes = static_cast<std::int64_t>(memory.reserved);
      figures.in_use_bytes =
          memory.total > unavailable ? static_cast<std::int64_t>(memory.total - unavailable) : std::int64_t{0};
      figures.query = kNvmlMemoryQueryV2;
      return figures;
    }
  }
  NvmlMemoryV1 memory;
  if (v1 && v1(memory) == 0) {
    figures.total_bytes = static_cast<std::int64_t>(memory.total);
    figures.in_use_bytes = static_cast<std::int64_t>(memory.used);
    figures.query = kNvmlMemoryQueryV1;
  }
  return figures;
}

// Note [Which process uses a GPU]
// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
// The scheduler needs to know what each of its tasks uses on its GPUs: to
// see that a task has reached its GPU, to record its peak memory, and to
// pack tasks by memory. NVML lists the compute processes on a GPU with the
// memory each has allocated (nvmlDeviceGetComputeRunningProcesses; what
// nvidia-smi shows under "Processes"). There are three versions: _v3 and
// _v2 fill a 24-byte entry (pid, memory, MIG instance ids), the first one a
// 16-byte entry (pid, memory); the newest the library has is asked, once
// more with a larger buffer when NVML answers INSUFFICIENT_SIZE (a process
// started between the two calls). An entry's memory may be "not available"
// (all bits set): it is kept as unknown (-1), not as 16 EiB. The process
// ids are those of the driver's PID namespace: in a container without the
// host's PID namespace they match no process the scheduler knows, and the
// scheduler then sees no task of its own on any GPU (it says so; see Note
// [What a task uses on its GPUs] in scheduler/gpu_memory.hpp).
// read_nvml_processes() is the one path from NVML's answer to the list, for
// the real library and for testing::FakeRuntime alike.

/// nvmlProcessInfo_v1_t (layout of nvml.h).
struct NvmlProcessInfoV1 {
  unsigned int pid = 0;
  unsigned long long used_gpu_memory = 0;
};
static_assert(sizeof(NvmlProcessInfoV1) == 16, "nvmlProcessInfo_v1_t is 16 bytes in nvml.h");

/// nvmlProcessInfo_t of _v2 and _v3 (layout of nvml.h).
struct NvmlProcessInfoV2 {
  unsigned int pid = 0;
  unsigned long long used_gpu_memory = 0;
  unsigned int gpu_instance_id = 0;
  unsigned int compute_instance_id = 0;
};
static_assert(sizeof(NvmlProcessInfoV2) == 24, "nvmlProcessInfo_v2_t is 24 bytes in nvml.h");

/// NVML's "value not available" (NVML_VALUE_NOT_AVAILABLE for 64-bit values).
inline constexpr unsigned long long kNvmlValueNotAvailable = ~0ULL;

/// The processes on one GPU, or nothing when NVML could not list them.
/// `v2` asks _v3 or _v2 (empty when the library has neither), `v1` the first
/// version (empty when absent); each takes the buffer's capacity in `count`
/// and returns NVML's status. See Note [Which process uses a GPU].
inline std::optional<std::vector<GpuProcess>> read_nvml_processes(
    const std::function<int(unsigned int&, NvmlProcessInfoV2*)>& v2,
    const std::function<int(unsigned int&, NvmlProcessInfoV1*)>& v1) {
  constexpr int kInsufficientSize = 7;  // NVML_ERROR_INSUFFICIENT_SIZE
  const auto ask = [](const auto& query, auto entry) -> std::optional<std::vector<GpuProcess>> {
    std::vector<decltype(entry)> buffer(32);
    for (int attempt = 0; attempt < 4; ++attempt) {
      auto count = static_cast<unsigned int>(buffer.size());
      const int status = query(count, buffer.data());
      if (status == kInsufficientSize && count >= buffer.size()) {
        buffer.resize(static_cast<std::size_t>(count) + 16);
        continue;
      }
      if (status != 0) return std::nullopt;
      std::vector<GpuProcess> processes;
      for (unsigned int i = 0; i < count && i < buffer.size(); ++i) {
        const unsigned long long used = buffer[i].used_gpu_memory;
        processes.push_back({static_cast<long>(buffer[i].pid),
                             used == kNvmlValueNotAvailable ? std::int64_t{-1} : static_cast<std::int64_t>(used)});
      }
      return processes;
    }
    return std::nullopt;
  };
  if (v2) {
    if (auto processes = ask(v2, NvmlProcessInfoV2{})) return processes;
  }
  if (v1) return ask(v1, NvmlProcessInfoV1{});
  return std::nullopt;
}

/// One GPU as NVML sees it (NVML numbers GPUs as nvidia-smi does, by PCI bus).
struct NvmlGpu {
  int index = -1;
  std::string name;
  std::string uuid;
  std::string pci_bus_id;  // normalised: "0000:3b:00.0"
  int cc_major = 0;
  int cc_minor = 0;
  NvmlMemoryFigures memory;
  /// The compute processes on it; nullopt when NVML cannot list them.
  std::optional<std::vector<GpuProcess>> processes;
};

/// PCI bus id in one spelling for CUDA's and NVML's numbers alike.
inline std::string format_pci_bus_id(unsigned domain, unsigned bus, unsigned device) {
  return fmt::format("{:04x}:{:02x}:{:02x}.0", domain, bus, device);
}

/// The loaded NVML library, or why it is not there. One per process.
class Nvml {
 public:
  /// The process-wide instance; loads NVML on first use.
  static Nvml& instance() {
    static Nvml nvml;
    return nvml;
  }

  bool available() const { return available_; }
  /// Why NVML cannot be used ("" when it can).
  const std::string& unavailable_reason() const { return reason_; }
  std::string driver_version() const;
  /// Every GPU of the machine, with fresh memory figures. Empty without NVML.
  std::vector<NvmlGpu> gpus() const;

  Nvml(const Nvml&) = delete;
  Nvml& operator=(const Nvml&) = delete;

 private:
  Nvml();

#if MULTIGPU_WITH_NVML
  // The few NVML types used, with the layout of nvml.h (stable since NVML 10).
  using Device = struct NvmlDeviceOpaque*;
  struct PciInfo {
    char bus_id_legacy[16];
    unsigned int domain, bus, device, pci_device_id, pci_subsystem_id;
    char bus_id[32];
  };
  using InitFn = int (*)();
  using CountFn = int (*)(unsigned int*);
  using HandleFn = int (*)(unsigned int, Device*);
  using StringFn = int (*)(Device, char*, unsigned int);
  using PciFn = int (*)(Device, PciInfo*);
  using MemoryFn = int (*)(Device, NvmlMemoryV1*);
  using MemoryV2Fn = int (*)(Device, NvmlMemoryV2*);
  using CapabilityFn = int (*)(Device, int*, int*);
  using DriverFn = int (*)(char*, unsigned int);
  using ProcessesV2Fn = int (*)(Device, unsigned int*, NvmlProcessInfoV2*);
  using ProcessesV1Fn = int (*)(Device, unsigned int*, NvmlProcessInfoV1*);
  using ErrorStringFn = const char* (*)(int);

  template <class Fn>
  bool bind(Fn& fn, const char* name) {
    fn = reinterpret_cast<Fn>(dlsym(handle_, name));
    if (fn == nullptr) reason_ = fmt::format("NVML has no {}", name);
    return fn != nullptr;
  }

  void* handle_ = nullptr;
  CountFn count_ = nullptr;
  HandleFn handle_by_index_ = nullptr;
  StringFn name_ = nullptr;
  StringFn uuid_ = nullptr;
  PciFn pci_ = nullptr;
  MemoryFn memory_ = nullptr;
  MemoryV2Fn memory_v2_ = nullptr;  // drivers before R510 have none
  ProcessesV2Fn processes_v2_ = nullptr;  // _v3, else _v2; see Note [Which process uses a GPU]
  ProcessesV1Fn processes_v1_ = nullptr;
  CapabilityFn capability_ = nullptr;
  DriverFn driver_ = nullptr;
  ErrorStringFn error_string_ = nullptr;
  mutable std::mutex mutex_;  // NVML is thread-safe; this keeps our reads consistent
#endif
  bool available_ = false;
  std::string reason_;
};

#if MULTIGPU_WITH_NVML

inline Nvml::Nvml() {
  for (const char* library : {"libnvidia-ml.so.1", "libnvidia-ml.so"}) {
    handle_ = dlopen(library, RTLD_NOW | RTLD_LOCAL);
    if (handle_ != nullptr) break;
  }
  if (handle_ == nullptr) {
    reason_ = "libnvidia-ml.so.1 not found (no NVIDIA driver on this machine?)";
    return;
  }
  InitFn init = nullptr;
  if (!bind(init, "nvmlInit_v2") || !bind(count_, "nvmlDeviceGetCount_v2") ||
      !bind(handle_by_index_, "nvmlDeviceGetHandleByIndex_v2") || !bind(name_, "nvmlDeviceGetName") ||
      !bind(uuid_, "nvmlDeviceGetUUID") || !bind(pci_, "nvmlDeviceGetPciInfo_v3") ||
      !bind(memory_, "nvmlDeviceGetMemoryInfo") ||
      !bind(capability_, "nvmlDeviceGetCudaComputeCapability") ||
      !bind(driver_, "nvmlSystemGetDriverVersion") || !bind(error_string_, "nvmlErrorString")) {
    return;
  }
  memory_v2_ = reinterpret_cast<MemoryV2Fn>(dlsym(handle_, kNvmlMemoryQueryV2));
  for (const char* name : {"nvmlDeviceGetComputeRunningProcesses_v3", "nvmlDeviceGetComputeRunningProcesses_v2"}) {
    processes_v2_ = reinterpret_cast<ProcessesV2Fn>(dlsym(handle_, name));
    if (processes_v2_ != nullptr) break;
  }
  processes_v1_ = reinterpret_cast<ProcessesV1Fn>(dlsym(handle_, "nvmlDeviceGetComputeRunningProcesses"));
  const int status = init();
  if (status != 0) {
    reason_ = fmt::format("nvmlInit failed: {}", error_string_(status));
    return;
  }
  available_ = true;
}

inline std::string Nvml::driver_version() const {
  if (!available_) return "";
  std::lock_guard<std::mutex> lock(mutex_);
  char buffer[96] = {};
  return driver_(buffer, sizeof(buffer)) == 0 ? std::string(buffer) : std::string();
}

inline std::vector<NvmlGpu> Nvml::gpus() const {
  std::vector<NvmlGpu> gpus;
  if (!available_) return gpus;
  std::lock_guard<std::mutex> lock(mutex_);
  unsigned int count = 0;
  if (count_(&count) != 0) return gpus;
  for (unsigned int i = 0; i < count; ++i) {
    Device device = nullptr;
    NvmlGpu gpu;
    gpu.index = static_cast<int>(i);
    if (handle_by_index_(i, &device) != 0) {
      gpu.name = "(NVML cannot open this GPU)";
      gpus.push_back(gpu);
      continue;
    }
    char text[96] = {};
    if (name_(device, text, sizeof(text)) == 0) gpu.name = text;
    char uuid[96] = {};
    if (uuid_(device, uuid, sizeof(uuid)) == 0) gpu.uuid = uuid;
    PciInfo pci{};
    if (pci_(device, &pci) == 0) gpu.pci_bus_id = format_pci_bus_id(pci.domain, pci.bus, pci.device);
    std::function<int(NvmlMemoryV2&)> v2;
    if (memory_v2_ != nullptr) v2 = [&](NvmlMemoryV2& memory) { return memory_v2_(device, &memory); };
    gpu.memory = read_nvml_memory(v2, [&](NvmlMemoryV1& memory) { return memory_(device, &memory); });
    capability_(device, &gpu.cc_major, &gpu.cc_minor);
    std::function<int(unsigned int&, NvmlProcessInfoV2*)> processes_v2;
    std::function<int(unsigned int&, NvmlProcessInfoV1*)> processes_v1;
    if (processes_v2_ != nullptr) {
      processes_v2 = [&](unsigned int& capacity, NvmlProcessInfoV2* infos) { return processes_v2_(device, &capacity, infos); };
    }
    if (processes_v1_ != nullptr) {
      processes_v1 = [&](unsigned int& capacity, NvmlProcessInfoV1* infos) { return processes_v1_(device, &capacity, infos); };
    }
    gpu.processes = read_nvml_processes(processes_v2, processes_v1);
    gpus.push_back(std::move(gpu));
  }
  return gpus;
}

#else

inline Nvml::Nvml() : reason_("NVML support not compiled (MULTIGPU_WITH_NVML=0)") {}
inline std::string Nvml::driver_version() const { return ""; }
inline std::vector<NvmlGpu> Nvml::gpus() const { return {}; }

#endif

}  // namespace detail
}  // namespace multigpu
