#pragma once
/// @file
/// The device report (DeviceReport): everything worth knowing to check a GPU
/// setup, what it concludes (notes, verdict), and its text. The facts are
/// gathered by BasicDeviceManager::report (device.hpp); what they mean is
/// decided here, without a runtime.

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <fmt/core.h>

#include "multigpu/config.hpp"
#include "multigpu/device/types.hpp"
#include "multigpu/device_spec.hpp"
#include "multigpu/runtime.hpp"

namespace multigpu {

/// Everything the device report shows; `text()` formats it.
struct DeviceReport {
  /// LibTorch, CUDA, driver, NVML and NCCL as the runtime reports them.
  RuntimeInfo runtime;
  /// CUDA_VISIBLE_DEVICES as this process sees it.
  VisibleDevices cuda_visible_devices;
  /// CUDA_DEVICE_ORDER; nullopt when not set.
  std::optional<std::string> cuda_device_order;
  /// Memory in use above which a GPU counts as busy.
  std::int64_t busy_threshold_mib = 0;
  /// The visible GPUs, in logical order.
  std::vector<DeviceInfo> devices;
  /// peer_access[i][j]: logical GPU i can read GPU j's memory; nullopt when unknown.
  std::vector<std::vector<std::optional<bool>>> peer_access;
  std::string no_gpu_reason;    ///< Why no GPU is visible ("" when some are).
  std::vector<std::string> notes;  ///< Things worth a look (numbering, truncated variables, CPU-only LibTorch).
  /// The device spec the report resolved.
  std::string spec;
  std::optional<DeviceSelection> selection;  ///< What `spec` resolved to, if it did.
  std::string error;            ///< Why `spec` cannot be satisfied ("" if it can).
  bool ok = false;              ///< `spec` resolved.
  std::string verdict;          ///< One line: what training will run on.
  /// The report as text, ready to print.
  std::string text() const;
};

namespace detail {

/// Fills in what the facts of `report` mean: its notes, `ok` and the
/// verdict. The facts are the runtime's figures, the devices, the spec and
/// either what it resolved to (`selection`) or why not (`error`).
void conclude_device_report(DeviceReport& report);

}  // namespace detail

// ---------------------------------------------------------------------------
// Definitions

inline void detail::conclude_device_report(DeviceReport& report) {
  const auto& cvd = report.cuda_visible_devices;
  if (!cvd.problem.empty()) {
    report.notes.push_back(fmt::format("CUDA reads CUDA_VISIBLE_DEVICES only up to the first bad entry: {}; "
                                       "ignored: {}",
                                       cvd.problem, detail::quote(cvd.ignored)));
  }
  if (!report.runtime.cuda_build && !report.runtime.machine_gpus.empty()) {
    report.notes.push_back(fmt::format(
        "this machine has {} NVIDIA GPU(s), but this program's LibTorch is CPU-only: nothing will run "
        "on them",
        report.runtime.machine_gpus.size()));
  }
  bool numbering_differs = false;
  for (const auto& d : report.devices) {
    numbering_differs = numbering_differs || (d.physical_index >= 0 && d.nvml_index >= 0 &&
                                              d.physical_index != d.nvml_index);
  }
  if (numbering_differs) {
    report.notes.push_back(
        "CUDA numbers these GPUs differently from nvidia-smi (CUDA_DEVICE_ORDER is not PCI_BUS_ID); "
        "export CUDA_DEVICE_ORDER=PCI_BUS_ID so that CUDA_VISIBLE_DEVICES means nvidia-smi's numbers");
  }
  if (report.runtime.memory_source == "cudaMemGetInfo") {
    report.notes.push_back("NVML is missing, so memory was read through a CUDA context on every GPU "
                           "(a few hundred MiB each)");
  }
  std::string reserved_counted;
  for (const auto& d : report.devices) {
    if (d.memory_query == detail::kNvmlMemoryQueryV1) {
      reserved_counted += fmt::format("{}cuda:{}", reserved_counted.empty() ? "" : ", ", d.index);
    }
  }
  if (!reserved_counted.empty()) {
    // See Note [Reserved memory] in detail/nvml.hpp.
    report.notes.push_back(fmt::format(
        "memory in use on {} was read with NVML's v1 query (nvmlDeviceGetMemoryInfo; this driver has no working "
        "nvmlDeviceGetMemoryInfo_v2), which counts the memory the driver reserves for itself as used: several "
        "hundred MiB on an idle datacenter GPU. If idle GPUs show as BUSY, update the driver (R510 or later) or "
        "raise DeviceManagerOptions::busy_threshold_mib",
        reserved_counted));
  }

  report.ok = report.selection.has_value();
  if (!report.ok) {
    report.verdict = fmt::format("ERROR: {}", report.error);
  } else if (report.selection->cpu_fallback) {
    report.verdict = fmt::format("CPU: no GPU is visible ({}); training will run on the CPU", report.no_gpu_reason);
  } else if (report.selection->is_cpu()) {
    report.verdict = fmt::format("CPU: {} asked for the CPU; training will run on {}", detail::quote(report.spec),
                                 report.selection->describe());
  } else {
    report.verdict = fmt::format("OK: training will run on {}", report.selection->describe());
  }
}

inline std::string DeviceReport::text() const {
  std::string out;
  auto line = [&](std::string_view key, const std::string& value) {
    out += fmt::format("  {:<22}{}\n", key, value);
  };
  out += fmt::format("multigpu {} device report\n", MULTIGPU_VERSION_STRING);
  line("LibTorch", fmt::format("{}, {}", runtime.torch_version,
                               runtime.cuda_build ? "built with CUDA" : "CPU-only (no CUDA)"));
  line("CUDA runtime", runtime.cuda_runtime_version.empty() ? "-" : runtime.cuda_runtime_version);
  line("NVIDIA driver", runtime.driver_version.empty() ? "-" : runtime.driver_version);
  line("NVML", runtime.nvml_problem.empty()
                   ? fmt::format("available, sees {} GPU(s)", runtime.machine_gpus.size())
                   : fmt::format("not available: {}", runtime.nvml_problem));
  line("NCCL", runtime.nccl_version.empty() ? "not compiled in (MULTIGPU_WITH_NCCL=0)" : runtime.nccl_version);
  // Which NVML query answered: see Note [Reserved memory] in detail/nvml.hpp.
  std::string queries;
  for (const auto& [query, meaning] : {std::pair<const char*, const char*>{detail::kNvmlMemoryQueryV2, "not counted"},
                                      {detail::kNvmlMemoryQueryV1, "counted as used"}}) {
    if (std::any_of(devices.begin(), devices.end(), [&](const DeviceInfo& d) { return d.memory_query == query; })) {
      queries += fmt::format("{}{}: driver-reserved memory {}", queries.empty() ? "" : ", ", query, meaning);
    }
  }
  line("memory figures from",
       queries.empty() ? runtime.memory_source : fmt::format("{} ({})", runtime.memory_source, queries));
  line("CUDA_VISIBLE_DEVICES", cuda_visible_devices.set ? detail::quote(cuda_visible_devices.value) : "(not set)");
  line("CUDA_DEVICE_ORDER", cuda_device_order ? detail::quote(*cuda_device_order)
                                              : "(not set: CUDA numbers the fastest GPU first)");
  line("busy threshold", fmt::format("more than {} MiB in use", busy_threshold_mib));
  out += "\n";

  if (devices.empty()) {
    out += fmt::format("GPUs visible to this process: none ({})\n", no_gpu_reason);
  } else {
    out += fmt::format("GPUs visible to this process: {}\n", devices.size());
    out += fmt::format("  {:<7} {:<9} {:<11} {:<26} {:<4} {:>20}  {:<13} {}\n", "device", "physical",
                       "nvidia-smi", "name", "cc", "memory used/total", "pci bus", "state");
    for (const auto& d : devices) {
      out += fmt::format("  {:<7} {:<9} {:<11} {:<26} {:<4} {:>20}  {:<13} {}\n", fmt::format("cuda:{}", d.index),
                         d.physical_index >= 0 ? std::to_string(d.physical_index) : std::string("?"),
                         d.nvml_index >= 0 ? std::to_string(d.nvml_index) : std::string("?"), d.name,
                         fmt::format("{}.{}", d.cc_major, d.cc_minor),
                         fmt::format("{} / {} MiB", detail::format_mib(d.used_bytes), detail::format_mib(d.total_bytes)),
                         d.pci_bus_id.empty() ? std::string("?") : d.pci_bus_id,
                         d.used_bytes < 0 ? "unknown" : (d.busy ? "BUSY" : "free"));
    }
  }
  if (!runtime.cuda_build && !runtime.machine_gpus.empty()) {
    out += "GPUs of this machine (NVML), unusable from this program:\n";
    for (const auto& g : runtime.machine_gpus) {
      out += fmt::format("  {}: {} ({} / {} MiB)\n", g.nvml_index, g.name, detail::format_mib(g.used_bytes),
                         detail::format_mib(g.total_bytes));
    }
  }
  if (devices.size() > 1) {
    out += "\nPeer access (row reads column's memory directly):\n        ";
    for (const auto& d : devices) out += fmt::format("{:>8}", fmt::format("cuda:{}", d.index));
    out += "\n";
    for (std::size_t i = 0; i < devices.size(); ++i) {
      out += fmt::format("  {:<6}", fmt::format("cuda:{}", devices[i].index));
      for (std::size_t j = 0; j < devices.size(); ++j) {
        const auto& value = peer_access[i][j];
        out += fmt::format("{:>8}", i == j ? "-" : (!value ? "?" : (*value ? "yes" : "no")));
      }
      out += "\n";
    }
  }
  for (const auto& note : notes) out += fmt::format("\nNote: {}\n", note);
  out += fmt::format("\nDevice spec {}: ", detail::quote(spec));
  if (selection) {
    out += selection->describe() + "\n";
    for (const auto& warning : selection->warnings) out += fmt::format("  warning: {}\n", warning);
  } else {
    out += "cannot be satisfied\n";
  }
  out += fmt::format("Verdict: {}\n", verdict);
  return out;
}

}  // namespace multigpu
