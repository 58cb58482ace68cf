#pragma once
/// @file
/// Devices: which GPUs exist, which are busy, what a device spec resolves to,
/// how CUDA_VISIBLE_DEVICES maps logical to physical numbers, the diagnostics
/// report, and how a batch is split over devices.
///
///   multigpu::DeviceManager devices;
///   multigpu::DeviceSelection chosen = devices.select("auto");  // GPUs, else CPU with a warning
///   for (const auto& d : chosen) std::cout << d.label() << "\n";  // cuda:0 (physical 2, NVIDIA A40)
///
/// Numbers in a spec are logical, as CUDA and LibTorch number GPUs inside this
/// process (after CUDA_VISIBLE_DEVICES). Thread safety: a manager is not
/// shared between threads without a lock; selections are plain values.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <optional>
#include <sstream>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <c10/core/Device.h>
#include <fmt/core.h>

#include "multigpu/batch_plan.hpp"  // split_batch and plan_batch were first declared here; programs that include only device.hpp still find them
#include "multigpu/config.hpp"
#include "multigpu/device_spec.hpp"
#include "multigpu/error.hpp"
#include "multigpu/runtime.hpp"

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

/// Finds devices, judges them and resolves device specs, over a runtime
/// policy (see runtime.hpp): SystemRuntime for the real machine
/// (DeviceManager), testing::FakeRuntime for tests.
template <class Runtime>
class BasicDeviceManager {
 public:
  /// A manager of the real machine (or a default-built runtime).
  explicit BasicDeviceManager(DeviceManagerOptions options = {}) : options_(options) {}
  /// A manager over the given runtime (a testing::FakeRuntime in tests).
  explicit BasicDeviceManager(Runtime runtime, DeviceManagerOptions options = {})
      : runtime_(std::move(runtime)), options_(options) {}

  /// Visible GPUs in logical order, as of the last query (the first call queries).
  const std::vector<DeviceInfo>& devices();
  /// Queries the runtime again (memory in use changes).
  void refresh();
  /// The CPU as a device.
  DeviceInfo cpu_device() const;
  /// CUDA_VISIBLE_DEVICES as this process sees it.
  VisibleDevices cuda_visible_devices() const;

  /// Resolves a spec (see DeviceSpec) against fresh device figures. Sends its
  /// warnings to multigpu::warn. Throws DeviceError when it cannot be
  /// satisfied, naming the spec, the problem and the visible devices.
  DeviceSelection select(std::string_view spec);

  /// Everything worth knowing to check a GPU setup, and what `spec` resolves
  /// to. Never throws for a bad spec: the report carries the error.
  DeviceReport report(std::string_view spec = "auto");

  /// "visible: cuda:0..cuda:3 (CUDA_VISIBLE_DEVICES=0,1,4,7)", for messages.
  std::string visible_summary();
  /// Why no GPU is visible, in words ("" when one is).
  std::string no_gpu_reason();

  /// The options in use.
  const DeviceManagerOptions& options() const { return options_; }
  /// Replaces the options (for the next query or selection).
  void set_options(const DeviceManagerOptions& options) { options_ = options; }
  /// The runtime it asks (to script a testing::FakeRuntime).
  Runtime& runtime() { return runtime_; }

 private:
  DeviceSelection resolve(std::string_view spec);  // no logging; throws DeviceError
  DeviceInfo make_info(const RuntimeGpu& gpu, int logical, const VisibleDevices& cvd,
                       bool pci_order) const;
  [[noreturn]] void fail(std::string_view spec, const std::string& problem);
  void require_gpus(std::string_view spec);

  Runtime runtime_;
  DeviceManagerOptions options_;
  std::vector<DeviceInfo> devices_;
  bool queried_ = false;
};

/// The device manager of the real machine.
using DeviceManager = BasicDeviceManager<SystemRuntime>;

// ---------------------------------------------------------------------------
// Definitions

namespace detail {

inline std::string format_mib(std::int64_t bytes) {
  return bytes < 0 ? std::string("?") : fmt::format("{}", bytes >> 20);
}

inline std::string cvd_text(const VisibleDevices& cvd) {
  return cvd.set ? fmt::format("CUDA_VISIBLE_DEVICES={}", quote(cvd.value)) : "CUDA_VISIBLE_DEVICES not set";
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

template <class Runtime>
const std::vector<DeviceInfo>& BasicDeviceManager<Runtime>::devices() {
  if (!queried_) refresh();
  return devices_;
}

template <class Runtime>
void BasicDeviceManager<Runtime>::refresh() {
  const VisibleDevices cvd = cuda_visible_devices();
  const bool pci_order = runtime_.getenv("CUDA_DEVICE_ORDER").value_or("") == "PCI_BUS_ID";
  const auto gpus = runtime_.visible_gpus();
  devices_.clear();
  for (std::size_t i = 0; i < gpus.size(); ++i) {
    devices_.push_back(make_info(gpus[i], static_cast<int>(i), cvd, pci_order));
  }
  queried_ = true;
}

template <class Runtime>
DeviceInfo BasicDeviceManager<Runtime>::make_info(const RuntimeGpu& gpu, int logical,
                                                  const VisibleDevices& cvd, bool pci_order) const {
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
  info.busy = gpu.used_bytes >= 0 && gpu.used_bytes > (options_.busy_threshold_mib << 20);
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

template <class Runtime>
DeviceInfo BasicDeviceManager<Runtime>::cpu_device() const {
  DeviceInfo cpu;
  cpu.name = "CPU";
  return cpu;
}

template <class Runtime>
VisibleDevices BasicDeviceManager<Runtime>::cuda_visible_devices() const {
  const auto value = runtime_.getenv("CUDA_VISIBLE_DEVICES");
  return parse_cuda_visible_devices(value.has_value(), value.value_or(""));
}

template <class Runtime>
std::string BasicDeviceManager<Runtime>::visible_summary() {
  const auto& gpus = devices();
  const auto cvd = cuda_visible_devices();
  std::string list;
  if (gpus.empty()) {
    list = "no GPU";
  } else if (gpus.size() == 1) {
    list = "cuda:0";
  } else {
    list = fmt::format("cuda:0..cuda:{}", gpus.size() - 1);
  }
  return fmt::format("visible: {} ({})", list, detail::cvd_text(cvd));
}

template <class Runtime>
std::string BasicDeviceManager<Runtime>::no_gpu_reason() {
  if (!devices().empty()) return "";
  RuntimeInfo info = runtime_.info();
  const auto cvd = cuda_visible_devices();
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
               ? fmt::format("{} hides every GPU", detail::cvd_text(cvd))
               : fmt::format("{} hides every GPU: {}", detail::cvd_text(cvd), cvd.problem);
  }
  if (cvd.set) {
    return fmt::format("{} names no GPU of this machine", detail::cvd_text(cvd));
  }
  if (!info.cuda_error.empty()) return info.cuda_error;
  return "no NVIDIA GPU was found";
}

template <class Runtime>
void BasicDeviceManager<Runtime>::fail(std::string_view spec, const std::string& problem) {
  throw DeviceError(fmt::format("device spec {}: {}; {}", detail::quote(spec), problem, visible_summary()));
}

template <class Runtime>
void BasicDeviceManager<Runtime>::require_gpus(std::string_view spec) {
  if (!devices().empty()) return;
  throw DeviceError(fmt::format(
      "device spec {} asks for GPUs, but none is visible: {}. Use \"cpu\" to run on the CPU "
      "on purpose, or \"auto\" to take GPUs when there are some",
      detail::quote(spec), no_gpu_reason()));
}

template <class Runtime>
DeviceSelection BasicDeviceManager<Runtime>::select(std::string_view spec) {
  DeviceSelection selection = resolve(spec);
  for (const auto& warning : selection.warnings) warn(warning);
  return selection;
}

template <class Runtime>
DeviceSelection BasicDeviceManager<Runtime>::resolve(std::string_view text) {
  const DeviceSpec spec = parse_device_spec(text);
  refresh();
  DeviceSelection selection;
  selection.spec = std::string(text);
  const auto& gpus = devices_;
  const std::string threshold = fmt::format("{} MiB", options_.busy_threshold_mib);
  auto warn_if_busy = [&](const DeviceInfo& gpu) {
    if (gpu.busy) {
      selection.warnings.push_back(fmt::format(
          "{} is busy: {} MiB of {} MiB in use by other processes (threshold {}); using it "
          "because it was asked for by name",
          gpu.label(), detail::format_mib(gpu.used_bytes), detail::format_mib(gpu.total_bytes), threshold));
    }
  };
  auto busy_list = [&]() {
    std::string out;
    for (const auto& gpu : gpus) {
      if (!out.empty()) out += ", ";
      out += fmt::format("cuda:{} {} MiB{}", gpu.index, detail::format_mib(gpu.used_bytes),
                         gpu.busy ? " (busy)" : "");
    }
    return fmt::format("memory in use: {}; busy means more than {}", out, threshold);
  };

  switch (spec.kind) {
    case DeviceSpec::Kind::kCpu:
      if (spec.count > 1 && !options_.allow_duplicates) {
        fail(text, fmt::format("{} CPU replicas need DeviceManagerOptions::allow_duplicates", spec.count));
      }
      selection.devices.assign(static_cast<std::size_t>(spec.count), cpu_device());
      return selection;

    case DeviceSpec::Kind::kAuto: {
      if (gpus.empty()) {
        if (!options_.allow_cpu_fallback) require_gpus(text);
        selection.cpu_fallback = true;
        selection.devices.push_back(cpu_device());
        selection.warnings.push_back(fmt::format(
            "no GPU is visible ({}); device spec {} falls back to the CPU, training will be slow",
            no_gpu_reason(), detail::quote(text)));
        return selection;
      }
      std::vector<DeviceInfo> free;
      for (const auto& gpu : gpus) {
        if (!gpu.busy) free.push_back(gpu);
      }
      const auto wanted = static_cast<std::size_t>(spec.count);
      if (free.empty()) {
        fail(text, fmt::format("all {} visible GPU(s) are busy ({}); name GPUs to use them anyway, "
                               "or raise the busy threshold",
                               gpus.size(), busy_list()));
      }
      if (wanted > free.size()) {
        fail(text, fmt::format("asks for {} free GPU(s), but only {} of the {} visible are free ({})",
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
      require_gpus(text);
      selection.devices = gpus;
      for (const auto& gpu : gpus) warn_if_busy(gpu);
      return selection;

    case DeviceSpec::Kind::kCuda:
      require_gpus(text);
      selection.devices.push_back(gpus.front());
      warn_if_busy(gpus.front());
      return selection;

    case DeviceSpec::Kind::kList: {
      require_gpus(text);
      const auto cvd = cuda_visible_devices();
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
          fail(text, fmt::format("cuda:{} is not visible{}", wanted, hint));
        }
        for (std::size_t j = 0; j < i; ++j) {
          if (spec.gpus[j] == wanted && !options_.allow_duplicates) {
            fail(text, fmt::format("cuda:{} is listed twice; several replicas on one GPU need "
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
  fail(text, "unknown spec kind");
}

template <class Runtime>
DeviceReport BasicDeviceManager<Runtime>::report(std::string_view spec) {
  DeviceReport report;
  refresh();
  report.runtime = runtime_.info();
  report.cuda_visible_devices = cuda_visible_devices();
  report.cuda_device_order = runtime_.getenv("CUDA_DEVICE_ORDER");
  report.busy_threshold_mib = options_.busy_threshold_mib;
  report.devices = devices_;
  report.no_gpu_reason = no_gpu_reason();
  report.spec = std::string(spec);

  const std::size_t n = devices_.size();
  report.peer_access.assign(n, std::vector<std::optional<bool>>(n));
  for (std::size_t i = 0; i < n; ++i) {
    for (std::size_t j = 0; j < n; ++j) {
      if (i != j) report.peer_access[i][j] = runtime_.can_access_peer(static_cast<int>(i), static_cast<int>(j));
    }
  }

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
  for (const auto& d : devices_) {
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
  for (const auto& d : devices_) {
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

  try {
    report.selection = resolve(spec);
    report.ok = true;
    const auto& chosen = *report.selection;
    if (chosen.cpu_fallback) {
      report.verdict = fmt::format("CPU: no GPU is visible ({}); training will run on the CPU", report.no_gpu_reason);
    } else if (chosen.is_cpu()) {
      report.verdict = fmt::format("CPU: {} asked for the CPU; training will run on {}", detail::quote(spec),
                                   chosen.describe());
    } else {
      report.verdict = fmt::format("OK: training will run on {}", chosen.describe());
    }
  } catch (const DeviceError& e) {
    report.error = e.what();
    report.verdict = fmt::format("ERROR: {}", e.what());
  }
  return report;
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
