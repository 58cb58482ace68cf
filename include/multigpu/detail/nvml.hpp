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

#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

#include <fmt/core.h>

#include "multigpu/config.hpp"

#if MULTIGPU_WITH_NVML
#include <dlfcn.h>
#endif

namespace multigpu {
namespace detail {

/// One GPU as NVML sees it (NVML numbers GPUs as nvidia-smi does, by PCI bus).
struct NvmlGpu {
  int index = -1;
  std::string name;
  std::string uuid;
  std::string pci_bus_id;  // normalised: "0000:3b:00.0"
  int cc_major = 0;
  int cc_minor = 0;
  std::int64_t total_bytes = -1;
  std::int64_t used_bytes = -1;
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
  struct Memory {
    unsigned long long total, free, used;
  };
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
  using MemoryFn = int (*)(Device, Memory*);
  using CapabilityFn = int (*)(Device, int*, int*);
  using DriverFn = int (*)(char*, unsigned int);
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
    Memory memory{};
    if (memory_(device, &memory) == 0) {
      gpu.total_bytes = static_cast<std::int64_t>(memory.total);
      gpu.used_bytes = static_cast<std::int64_t>(memory.used);
    }
    capability_(device, &gpu.cc_major, &gpu.cc_minor);
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
