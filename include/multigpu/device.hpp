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
///
/// The room: this header holds the manager, a thin template that asks its
/// runtime for facts (runtime.hpp) and passes them to plain code:
/// device/types.hpp (DeviceInfo, DeviceSelection, DeviceManagerOptions),
/// device/manager_core.hpp (what each GPU's numbers are, whether it is busy,
/// how a spec resolves), device/report.hpp (DeviceReport and its verdict).
/// Specs are parsed in device_spec.hpp.

#include <cstddef>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "multigpu/batch_plan.hpp"  // split_batch and plan_batch were first declared here; programs that include only device.hpp still find them
#include "multigpu/config.hpp"
#include "multigpu/device/manager_core.hpp"
#include "multigpu/device/report.hpp"
#include "multigpu/device/types.hpp"
#include "multigpu/device_spec.hpp"
#include "multigpu/error.hpp"
#include "multigpu/runtime.hpp"

namespace multigpu {

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

  Runtime runtime_;
  DeviceManagerOptions options_;
  std::vector<DeviceInfo> devices_;
  bool queried_ = false;
};

/// The device manager of the real machine.
using DeviceManager = BasicDeviceManager<SystemRuntime>;

// ---------------------------------------------------------------------------
// Definitions

template <class Runtime>
const std::vector<DeviceInfo>& BasicDeviceManager<Runtime>::devices() {
  if (!queried_) refresh();
  return devices_;
}

template <class Runtime>
void BasicDeviceManager<Runtime>::refresh() {
  const VisibleDevices cvd = cuda_visible_devices();
  const bool pci_order = runtime_.getenv("CUDA_DEVICE_ORDER").value_or("") == "PCI_BUS_ID";
  devices_ = detail::gpu_device_infos(runtime_.visible_gpus(), cvd, pci_order, options_.busy_threshold_mib);
  queried_ = true;
}

template <class Runtime>
DeviceInfo BasicDeviceManager<Runtime>::cpu_device() const {
  return detail::cpu_device_info();
}

template <class Runtime>
VisibleDevices BasicDeviceManager<Runtime>::cuda_visible_devices() const {
  const auto value = runtime_.getenv("CUDA_VISIBLE_DEVICES");
  return parse_cuda_visible_devices(value.has_value(), value.value_or(""));
}

template <class Runtime>
std::string BasicDeviceManager<Runtime>::visible_summary() {
  const std::size_t visible = devices().size();
  return detail::visible_summary(visible, cuda_visible_devices());
}

template <class Runtime>
std::string BasicDeviceManager<Runtime>::no_gpu_reason() {
  if (!devices().empty()) return "";
  const RuntimeInfo info = runtime_.info();
  return detail::no_gpu_reason(info, cuda_visible_devices());
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
  return detail::resolve_device_spec(text, spec, devices_, cuda_visible_devices(), options_,
                                     [this] { return no_gpu_reason(); });
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
  try {
    report.selection = resolve(spec);
  } catch (const DeviceError& e) {
    report.error = e.what();
  }
  detail::conclude_device_report(report);
  return report;
}

}  // namespace multigpu
