#pragma once
/// @file
/// The values of the device room: one device (DeviceInfo), what a device
/// spec resolved to (DeviceSelection), and how a DeviceManager judges
/// devices (DeviceManagerOptions). Plain values: no runtime, no logic beyond
/// formatting them for messages.

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <c10/core/Device.h>
#include <fmt/core.h>

#include "multigpu/config.hpp"
#include "multigpu/detail/nvml.hpp"  // GpuProcess

namespace multigpu {

/// One device that training can run on: a visible GPU or the CPU.
struct DeviceInfo {
  /// CUDA for a GPU, CPU for the CPU.
  c10::DeviceType type = c10::DeviceType::CPU;
  /// Logical CUDA number (what torch::Device("cuda:N") means); -1 for the CPU.
  int index = -1;
  /// The GPU's number without CUDA_VISIBLE_DEVICES, in CUDA's order (what
  /// CUDA_VISIBLE_DEVICES entries refer to); -1 when unknown or CPU.
  int physical_index = -1;
  /// nvidia-smi's number (PCI bus order); -1 when unknown or CPU.
  int nvml_index = -1;
  /// The CUDA_VISIBLE_DEVICES value that shows a child process exactly this
  /// GPU (as its cuda:0); "" for the CPU.
  std::string visible_devices_token;
  /// The GPU's name ("NVIDIA A40"); "CPU" for the CPU.
  std::string name;
  /// PCI bus id ("0000:3b:00.0"); "" when unknown or CPU.
  std::string pci_bus_id;
  /// The GPU's UUID ("GPU-..."); "" when unknown or CPU.
  std::string uuid;
  /// Compute capability, major.
  int cc_major = 0;
  /// Compute capability, minor.
  int cc_minor = 0;
  std::int64_t total_bytes = -1;  ///< -1 when unknown
  /// Memory in use by every process; -1 when unknown. The memory the driver
  /// reserves for itself is not counted, unless memory_query is NVML's v1
  /// query (drivers before R510). See Note [Reserved memory] in detail/nvml.hpp.
  std::int64_t used_bytes = -1;
  std::int64_t reserved_bytes = -1;  ///< Reserved by the driver; -1 when unknown (or counted in used_bytes)
  /// What used_bytes came from ("nvmlDeviceGetMemoryInfo_v2", ...; see RuntimeGpu).
  std::string memory_query;
  /// Memory in use above the manager's threshold when it was last queried.
  bool busy = false;
  /// The compute processes on it when it was last queried, with their
  /// memory; nullopt when unknown (no NVML). See Note [Which process uses a
  /// GPU] in detail/nvml.hpp.
  std::optional<std::vector<GpuProcess>> processes;

  /// Whether it is a GPU.
  bool is_cuda() const { return type == c10::DeviceType::CUDA; }
  /// Whether it is the CPU.
  bool is_cpu() const { return type == c10::DeviceType::CPU; }
  /// The LibTorch device ("cuda:1", "cpu").
  c10::Device device() const {
    return is_cuda() ? c10::Device(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(index))
                     : c10::Device(c10::DeviceType::CPU);
  }
  /// For messages and logs: "cuda:1 (physical 5, NVIDIA A40)" or "cpu".
  std::string label() const;
};

/// The devices a spec resolved to, in replica order (replica 0 is the primary).
struct DeviceSelection {
  std::string spec;                ///< As the user wrote it.
  /// The devices, in replica order.
  std::vector<DeviceInfo> devices;
  bool cpu_fallback = false;       ///< "auto" found no GPU and chose the CPU.
  std::vector<std::string> warnings;  ///< Also sent to multigpu::warn when selected.

  /// Number of devices.
  std::size_t size() const { return devices.size(); }
  /// Whether no device was selected.
  bool empty() const { return devices.empty(); }
  /// Device `i` (bounds-checked).
  const DeviceInfo& operator[](std::size_t i) const { return devices.at(i); }
  /// First device, for range-for.
  std::vector<DeviceInfo>::const_iterator begin() const { return devices.begin(); }
  /// Past the last device, for range-for.
  std::vector<DeviceInfo>::const_iterator end() const { return devices.end(); }
  /// Whether the selection is the CPU.
  bool is_cpu() const { return !devices.empty() && devices.front().is_cpu(); }
  /// The LibTorch devices, one per replica.
  std::vector<c10::Device> torch_devices() const;
  /// "2 GPUs: cuda:0 (physical 2, ...), cuda:1 (physical 5, ...)" or "1 CPU".
  std::string describe() const;
};

/// How a DeviceManager judges and chooses devices.
struct DeviceManagerOptions {
  /// Memory in use (MiB) above which a GPU is busy (used by someone else).
  std::int64_t busy_threshold_mib = MULTIGPU_DEFAULT_BUSY_THRESHOLD_MIB;
  /// Allow one device more than once ("0,0", "cpu,cpu"): several replicas on
  /// one device, for tests and for models too small to fill a GPU.
  bool allow_duplicates = false;
  /// "auto" without any visible GPU: true runs on the CPU with one warning
  /// line, false throws DeviceError.
  bool allow_cpu_fallback = true;
};

// ---------------------------------------------------------------------------
// Definitions

namespace detail {

/// Bytes as MiB for messages; "?" when unknown (-1).
inline std::string format_mib(std::int64_t bytes) {
  return bytes < 0 ? std::string("?") : fmt::format("{}", bytes >> 20);
}

}  // namespace detail

inline std::string DeviceInfo::label() const {
  if (is_cpu()) return "cpu";
  std::string out = fmt::format("cuda:{} (", index);
  if (physical_index >= 0) {
    out += fmt::format("physical {}, ", physical_index);
  } else if (!uuid.empty()) {
    out += fmt::format("{}, ", uuid);
  }
  return out + name + ")";
}

inline std::vector<c10::Device> DeviceSelection::torch_devices() const {
  std::vector<c10::Device> out;
  out.reserve(devices.size());
  for (const auto& d : devices) out.push_back(d.device());
  return out;
}

inline std::string DeviceSelection::describe() const {
  if (devices.empty()) return "no device";
  if (is_cpu()) {
    return devices.size() == 1 ? std::string("1 CPU replica") : fmt::format("{} CPU replicas", devices.size());
  }
  std::string out = fmt::format("{} GPU{}: ", devices.size(), devices.size() == 1 ? "" : "s");
  for (std::size_t i = 0; i < devices.size(); ++i) {
    if (i > 0) out += ", ";
    out += devices[i].label();
  }
  return out;
}

}  // namespace multigpu
