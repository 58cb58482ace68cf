#pragma once
/// @file
/// What a DeviceManager decides, without a runtime: the DeviceInfo of each
/// GPU the runtime reported (logical, physical and nvidia-smi numbers under
/// CUDA_VISIBLE_DEVICES; busy or free), how a device spec resolves against
/// them, and the words for "no GPU". BasicDeviceManager (device.hpp) asks its
/// runtime for the facts and passes them here; these functions are plain
/// `inline` code, compiled once whatever the runtime.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <c10/core/Device.h>
#include <fmt/core.h>

#include "multigpu/device/types.hpp"
#include "multigpu/device_spec.hpp"
#include "multigpu/error.hpp"
#include "multigpu/runtime.hpp"

namespace multigpu {
namespace detail {

/// "CUDA_VISIBLE_DEVICES=\"0,1\"" or "CUDA_VISIBLE_DEVICES not set", for messages.
std::string cvd_text(const VisibleDevices& cvd);

/// The GPU the runtime reported at logical number `logical`, as a
/// DeviceInfo: its physical number and CUDA_VISIBLE_DEVICES token under
/// `cvd` (`pci_order`: CUDA_DEVICE_ORDER=PCI_BUS_ID), and whether more than
/// `busy_threshold_mib` of its memory is in use.
DeviceInfo gpu_device_info(const RuntimeGpu& gpu, int logical, const VisibleDevices& cvd, bool pci_order,
                           std::int64_t busy_threshold_mib);
/// Every GPU the runtime reported, in logical order (see gpu_device_info).
std::vector<DeviceInfo> gpu_device_infos(const std::vector<RuntimeGpu>& gpus, const VisibleDevices& cvd,
                                         bool pci_order, std::int64_t busy_threshold_mib);
/// The CPU as a device.
DeviceInfo cpu_device_info();

/// "visible: cuda:0..cuda:3 (CUDA_VISIBLE_DEVICES=0,1,4,7)", for messages.
std::string visible_summary(std::size_t visible_gpus, const VisibleDevices& cvd);
/// Why a process that sees no GPU sees none, in words, from what the
/// runtime knows about the machine and CUDA_VISIBLE_DEVICES.
std::string no_gpu_reason(const RuntimeInfo& info, const VisibleDevices& cvd);

/// Throws the DeviceError of a spec that cannot be satisfied: the spec, the
/// problem, and the visible GPUs.
[[noreturn]] void throw_device_spec_error(std::string_view text, const std::string& problem,
                                          std::size_t visible_gpus, const VisibleDevices& cvd);

/// Resolves `spec` (parsed from `text`) against the visible GPUs `gpus`
/// (fresh figures, logical order). Warnings go into the selection, not to
/// multigpu::warn. Throws DeviceError when it cannot be satisfied.
/// `reason_for_no_gpu` is called only when `gpus` is empty (it may ask the
/// runtime).
DeviceSelection resolve_device_spec(std::string_view text, const DeviceSpec& spec,
                                    const std::vector<DeviceInfo>& gpus, const VisibleDevices& cvd,
                                    const DeviceManagerOptions& options,
                                    const std::function<std::string()>& reason_for_no_gpu);

// ---------------------------------------------------------------------------
// Definitions

inline std::string cvd_text(const VisibleDevices& cvd) {
  return cvd.set ? fmt::format("CUDA_VISIBLE_DEVICES={}", quote(cvd.value)) : "CUDA_VISIBLE_DEVICES not set";
}

inline DeviceInfo gpu_device_info(const RuntimeGpu& gpu, int logical, const VisibleDevices& cvd, bool pci_order,
                                  std::int64_t busy_threshold_mib) {
  DeviceInfo info;
  info.type = c10::DeviceType::CUDA;
  info.index = logical;
  info.nvml_index = gpu.nvml_index;
  info.name = gpu.name;
  info.pci_bus_id = gpu.pci_bus_id;
  info.uuid = gpu.uuid;
  info.cc_major = gpu.cc_major;
  info.cc_minor = gpu.cc_minor;
  info.total_bytes = gpu.total_bytes;
  info.used_bytes = gpu.used_bytes;
  info.reserved_bytes = gpu.reserved_bytes;
  info.memory_query = gpu.memory_query;
  info.processes = gpu.processes;
  info.busy = gpu.used_bytes >= 0 && gpu.used_bytes > (busy_threshold_mib << 20);
  const auto position = static_cast<std::size_t>(logical);
  if (!cvd.set) {
    info.physical_index = logical;
    info.visible_devices_token = std::to_string(logical);
  } else if (position < cvd.entries.size()) {
    const auto& entry = cvd.entries[position];
    info.visible_devices_token = entry.text;
    if (entry.kind == VisibleDeviceEntry::Kind::kIndex) {
      info.physical_index = entry.index;
    } else if (pci_order) {
      info.physical_index = gpu.nvml_index;  // CUDA's order is nvidia-smi's then
    }
  }
  if (info.visible_devices_token.empty()) info.visible_devices_token = gpu.uuid;
  return info;
}

inline std::vector<DeviceInfo> gpu_device_infos(const std::vector<RuntimeGpu>& gpus, const VisibleDevices& cvd,
                                                bool pci_order, std::int64_t busy_threshold_mib) {
  std::vector<DeviceInfo> out;
  out.reserve(gpus.size());
  for (std::size_t i = 0; i < gpus.size(); ++i) {
    out.push_back(gpu_device_info(gpus[i], static_cast<int>(i), cvd, pci_order, busy_threshold_mib));
  }
  return out;
}

inline DeviceInfo cpu_device_info() {
  DeviceInfo cpu;
  cpu.name = "CPU";
  return cpu;
}

inline std::string visible_summary(std::size_t visible_gpus, const VisibleDevices& cvd) {
  std::string list;
  if (visible_gpus == 0) {
    list = "no GPU";
  } else if (visible_gpus == 1) {
    list = "cuda:0";
  } else {
    list = fmt::format("cuda:0..cuda:{}", visible_gpus - 1);
  }
  return fmt::format("visible: {} ({})", list, cvd_text(cvd));
}

inline std::string no_gpu_reason(const RuntimeInfo& info, const VisibleDevices& cvd) {
  if (!info.cuda_build) {
    if (!info.machine_gpus.empty()) {
      return fmt::format("this program's LibTorch was built without CUDA, although the "
                         "machine has {} NVIDIA GPU(s): build against a CUDA LibTorch",
                         info.machine_gpus.size());
    }
    return "this program's LibTorch was built without CUDA";
  }
  if (cvd.set && cvd.entries.empty()) {
    return cvd.problem.empty()
               ? fmt::format("{} hides every GPU", cvd_text(cvd))
               : fmt::format("{} hides every GPU: {}", cvd_text(cvd), cvd.problem);
  }
  if (cvd.set) {
    return fmt::format("{} names no GPU of this machine", cvd_text(cvd));
  }
  if (!info.cuda_error.empty()) return info.cuda_error;
  return "no NVIDIA GPU was found";
}

inline void throw_device_spec_error(std::string_view text, const std::string& problem, std::size_t visible_gpus,
                                    const VisibleDevices& cvd) {
  throw DeviceError(fmt::format("device spec {}: {}; {}", quote(text), problem, visible_summary(visible_gpus, cvd)));
}

inline DeviceSelection resolve_device_spec(std::string_view text, const DeviceSpec& spec,
                                           const std::vector<DeviceInfo>& gpus, const VisibleDevices& cvd,
                                           const DeviceManagerOptions& options,
                                           const std::function<std::string()>& reason_for_no_gpu) {
  auto fail = [&](const std::string& problem) { throw_device_spec_error(text, problem, gpus.size(), cvd); };
  auto require_gpus = [&]() {
    if (!gpus.empty()) return;
    throw DeviceError(fmt::format(
        "device spec {} asks for GPUs, but none is visible: {}. Use \"cpu\" to run on the CPU "
        "on purpose, or \"auto\" to take GPUs when there are some",
        quote(text), reason_for_no_gpu()));
  };
  DeviceSelection selection;
  selection.spec = std::string(text);
  const std::string threshold = fmt::format("{} MiB", options.busy_threshold_mib);
  auto warn_if_busy = [&](const DeviceInfo& gpu) {
    if (gpu.busy) {
      selection.warnings.push_back(fmt::format(
          "{} is busy: {} MiB of {} MiB in use by other processes (threshold {}); using it "
          "because it was asked for by name",
          gpu.label(), format_mib(gpu.used_bytes), format_mib(gpu.total_bytes), threshold));
    }
  };
  auto busy_list = [&]() {
    std::string out;
    for (const auto& gpu : gpus) {
      if (!out.empty()) out += ", ";
      out += fmt::format("cuda:{} {} MiB{}", gpu.index, format_mib(gpu.used_bytes),
                         gpu.busy ? " (busy)" : "");
    }
    return fmt::format("memory in use: {}; busy means more than {}", out, threshold);
  };

  switch (spec.kind) {
    case DeviceSpec::Kind::kCpu:
      if (spec.count > 1 && !options.allow_duplicates) {
        fail(fmt::format("{} CPU replicas need DeviceManagerOptions::allow_duplicates", spec.count));
      }
      selection.devices.assign(static_cast<std::size_t>(spec.count), cpu_device_info());
      return selection;

    case DeviceSpec::Kind::kAuto: {
      if (gpus.empty()) {
        if (!options.allow_cpu_fallback) require_gpus();
        selection.cpu_fallback = true;
        selection.devices.push_back(cpu_device_info());
        selection.warnings.push_back(fmt::format(
            "no GPU is visible ({}); device spec {} falls back to the CPU, training will be slow",
            reason_for_no_gpu(), quote(text)));
        return selection;
      }
      std::vector<DeviceInfo> free;
      for (const auto& gpu : gpus) {
        if (!gpu.busy) free.push_back(gpu);
      }
      const auto wanted = static_cast<std::size_t>(spec.count);
      if (free.empty()) {
        fail(fmt::format("all {} visible GPU(s) are busy ({}); name GPUs to use them anyway, "
                         "or raise the busy threshold",
                         gpus.size(), busy_list()));
      }
      if (wanted > free.size()) {
        fail(fmt::format("asks for {} free GPU(s), but only {} of the {} visible are free ({})",
                         wanted, free.size(), gpus.size(), busy_list()));
      }
      if (wanted > 0) {
        // The N freest, kept in logical order so replica numbers read naturally.
        std::stable_sort(free.begin(), free.end(), [](const DeviceInfo& a, const DeviceInfo& b) {
          return a.used_bytes < b.used_bytes;
        });
        free.resize(wanted);
        std::sort(free.begin(), free.end(),
                  [](const DeviceInfo& a, const DeviceInfo& b) { return a.index < b.index; });
      }
      selection.devices = std::move(free);
      return selection;
    }

    case DeviceSpec::Kind::kAll:
      require_gpus();
      selection.devices = gpus;
      for (const auto& gpu : gpus) warn_if_busy(gpu);
      return selection;

    case DeviceSpec::Kind::kCuda:
      require_gpus();
      selection.devices.push_back(gpus.front());
      warn_if_busy(gpus.front());
      return selection;

    case DeviceSpec::Kind::kList: {
      require_gpus();
      for (std::size_t i = 0; i < spec.gpus.size(); ++i) {
        const int wanted = spec.gpus[i];
        if (wanted >= static_cast<int>(gpus.size())) {
          std::string hint;
          for (const auto& gpu : gpus) {
            if (cvd.set && gpu.physical_index == wanted) {
              hint = fmt::format(" (numbers in a spec are logical: physical GPU {} is cuda:{} here)",
                                 wanted, gpu.index);
            }
          }
          fail(fmt::format("cuda:{} is not visible{}", wanted, hint));
        }
        for (std::size_t j = 0; j < i; ++j) {
          if (spec.gpus[j] == wanted && !options.allow_duplicates) {
            fail(fmt::format("cuda:{} is listed twice; several replicas on one GPU need "
                             "DeviceManagerOptions::allow_duplicates",
                             wanted));
          }
        }
        const DeviceInfo& gpu = gpus[static_cast<std::size_t>(wanted)];
        bool first_time = true;
        for (std::size_t j = 0; j < i; ++j) first_time = first_time && spec.gpus[j] != wanted;
        if (first_time) warn_if_busy(gpu);
        selection.devices.push_back(gpu);
      }
      return selection;
    }
  }
  throw_device_spec_error(text, "unknown spec kind", gpus.size(), cvd);
}

}  // namespace detail
}  // namespace multigpu
