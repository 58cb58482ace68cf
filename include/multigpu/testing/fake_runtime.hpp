#pragma once
/// @file
/// A scripted machine for tests: N GPUs with names, memory in use, PCI bus
/// ids and UUIDs, its own environment (CUDA_VISIBLE_DEVICES,
/// CUDA_DEVICE_ORDER), and a LibTorch with or without CUDA. Plug it into
/// BasicDeviceManager (and the scheduler) to test device logic on any machine:
///
///   auto machine = multigpu::testing::FakeRuntime::with_gpus(8);
///   machine.set_used_mib(2, 9000).set_env("CUDA_VISIBLE_DEVICES", "0,1,4,7");
///   multigpu::BasicDeviceManager<multigpu::testing::FakeRuntime> devices(machine);
///
/// Copies share one machine, so a test can keep a copy and change memory in
/// use while a manager holds another. Thread-safe.

#include <algorithm>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <fmt/core.h>

#include "multigpu/device_spec.hpp"
#include "multigpu/runtime.hpp"

namespace multigpu {
namespace testing {

/// One scripted GPU. Position in FakeRuntime's list is its nvidia-smi number.
struct FakeGpu {
  std::string name = "NVIDIA RTX A5000";
  std::int64_t total_mib = 24564;
  std::int64_t used_mib = 0;
  std::string pci_bus_id;  ///< Default: derived from the position.
  std::string uuid;        ///< Default: derived from the position.
  int cc_major = 8;
  int cc_minor = 6;
  /// CUDA's default order (CUDA_DEVICE_ORDER=FASTEST_FIRST) lists faster GPUs
  /// first; with equal speed it keeps PCI order.
  int speed = 0;
};

/// A runtime policy (see runtime.hpp) that answers from a script.
class FakeRuntime {
 public:
  /// Its GPUs are scripted: nothing may make them CUDA's current device.
  static constexpr bool kRealDevices = false;

  /// A machine with no GPU and a CUDA build of LibTorch.
  FakeRuntime() : state_(std::make_shared<State>()) {}

  /// A machine with these GPUs (in nvidia-smi order).
  explicit FakeRuntime(std::vector<FakeGpu> gpus) : FakeRuntime() {
    for (std::size_t i = 0; i < gpus.size(); ++i) {
      if (gpus[i].pci_bus_id.empty()) gpus[i].pci_bus_id = fmt::format("0000:{:02x}:00.0", 0x10 + i);
      if (gpus[i].uuid.empty()) {
        gpus[i].uuid = fmt::format("GPU-fa4e{:04x}-0000-4000-8000-{:012x}", i, 0xabc000 + i);
      }
    }
    state_->gpus = std::move(gpus);
  }

  /// `count` identical GPUs, all free.
  static FakeRuntime with_gpus(int count, std::string name = "NVIDIA RTX A5000",
                               std::int64_t total_mib = 24564) {
    std::vector<FakeGpu> gpus(static_cast<std::size_t>(std::max(count, 0)));
    for (auto& gpu : gpus) {
      gpu.name = name;
      gpu.total_mib = total_mib;
    }
    return FakeRuntime(std::move(gpus));
  }

  /// Sets (or, with nullopt, unsets) a variable of the fake environment.
  /// Variables never set are absent: the real environment is not read.
  FakeRuntime& set_env(const std::string& name, std::optional<std::string> value) {
    std::lock_guard<std::mutex> lock(state_->mutex);
    state_->env[name] = std::move(value);
    return *this;
  }

  /// Memory in use on the GPU with this nvidia-smi number.
  FakeRuntime& set_used_mib(int nvml_index, std::int64_t mib) {
    std::lock_guard<std::mutex> lock(state_->mutex);
    state_->gpus.at(static_cast<std::size_t>(nvml_index)).used_mib = mib;
    return *this;
  }

  /// false: LibTorch is CPU-only; NVML still sees the GPUs, CUDA none.
  FakeRuntime& set_cuda_build(bool cuda_build) {
    std::lock_guard<std::mutex> lock(state_->mutex);
    state_->cuda_build = cuda_build;
    return *this;
  }

  /// Whether the GPUs can reach each other's memory directly.
  FakeRuntime& set_peer_access(bool peer_access) {
    std::lock_guard<std::mutex> lock(state_->mutex);
    state_->peer_access = peer_access;
    return *this;
  }

  /// How many times visible_gpus() was asked (each is a fresh memory query).
  int query_count() const {
    std::lock_guard<std::mutex> lock(state_->mutex);
    return state_->queries;
  }

  // --- the runtime policy ---------------------------------------------------

  RuntimeInfo info() {
    std::lock_guard<std::mutex> lock(state_->mutex);
    RuntimeInfo info;
    info.cuda_build = state_->cuda_build;
    info.cuda_runtime_version = state_->cuda_build ? "12.4" : "";
    info.driver_version = state_->gpus.empty() ? "" : "550.54.15";
    info.nccl_version = state_->cuda_build ? "2.21.5" : "";
    info.memory_source = "fake";
    for (std::size_t i = 0; i < state_->gpus.size(); ++i) info.machine_gpus.push_back(to_runtime(i));
    if (state_->cuda_build && state_->gpus.empty()) {
      info.cuda_error = "cudaGetDeviceCount: no CUDA-capable device is detected";
    }
    return info;
  }

  std::vector<RuntimeGpu> visible_gpus() {
    std::lock_guard<std::mutex> lock(state_->mutex);
    ++state_->queries;
    std::vector<RuntimeGpu> visible;
    if (!state_->cuda_build) return visible;
    // CUDA numbers GPUs fastest first unless CUDA_DEVICE_ORDER=PCI_BUS_ID,
    // then CUDA_VISIBLE_DEVICES picks from that numbering.
    std::vector<std::size_t> cuda_order(state_->gpus.size());
    for (std::size_t i = 0; i < cuda_order.size(); ++i) cuda_order[i] = i;
    if (env_locked("CUDA_DEVICE_ORDER").value_or("FASTEST_FIRST") != "PCI_BUS_ID") {
      std::stable_sort(cuda_order.begin(), cuda_order.end(), [&](std::size_t a, std::size_t b) {
        return state_->gpus[a].speed > state_->gpus[b].speed;
      });
    }
    std::vector<std::string> uuids;
    for (std::size_t i : cuda_order) uuids.push_back(state_->gpus[i].uuid);
    const auto cvd_value = env_locked("CUDA_VISIBLE_DEVICES");
    const auto cvd = parse_cuda_visible_devices(cvd_value.has_value(), cvd_value.value_or(""));
    for (int position : apply_cuda_visible_devices(cvd, uuids)) {
      visible.push_back(to_runtime(cuda_order[static_cast<std::size_t>(position)]));
    }
    return visible;
  }

  std::optional<std::string> getenv(const char* name) const {
    std::lock_guard<std::mutex> lock(state_->mutex);
    return env_locked(name);
  }

  std::optional<bool> can_access_peer(int, int) {
    std::lock_guard<std::mutex> lock(state_->mutex);
    return state_->peer_access;
  }

 private:
  struct State {
    mutable std::mutex mutex;
    std::vector<FakeGpu> gpus;
    std::map<std::string, std::optional<std::string>> env;
    bool cuda_build = true;
    bool peer_access = true;
    int queries = 0;
  };

  std::optional<std::string> env_locked(const std::string& name) const {
    auto found = state_->env.find(name);
    return found == state_->env.end() ? std::nullopt : found->second;
  }

  RuntimeGpu to_runtime(std::size_t nvml_index) const {
    const FakeGpu& gpu = state_->gpus[nvml_index];
    RuntimeGpu out;
    out.name = gpu.name;
    out.pci_bus_id = gpu.pci_bus_id;
    out.uuid = gpu.uuid;
    out.cc_major = gpu.cc_major;
    out.cc_minor = gpu.cc_minor;
    out.total_bytes = gpu.total_mib << 20;
    out.used_bytes = gpu.used_mib << 20;
    out.nvml_index = static_cast<int>(nvml_index);
    return out;
  }

  std::shared_ptr<State> state_;
};

}  // namespace testing
}  // namespace multigpu
