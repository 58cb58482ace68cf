#pragma once
/// @file
/// A scripted machine for tests: N GPUs with names, memory in use (and
/// reserved by the driver, answered through the same NVML queries as the real
/// machine's), PCI bus ids and UUIDs, its own environment
/// (CUDA_VISIBLE_DEVICES, CUDA_DEVICE_ORDER), and a LibTorch with or without
/// CUDA. Plug it into BasicDeviceManager (and the scheduler) to test device
/// logic on any machine:
///
///   auto machine = multigpu::testing::FakeRuntime::with_gpus(8);
///   machine.set_used_mib(2, 9000).set_env("CUDA_VISIBLE_DEVICES", "0,1,4,7");
///   multigpu::BasicDeviceManager<multigpu::testing::FakeRuntime> devices(machine);
///
/// Copies share one machine, so a test can keep a copy and change memory in
/// use while a manager holds another. Thread-safe.

#include <algorithm>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <fmt/core.h>

#include "multigpu/detail/nvml.hpp"
#include "multigpu/device_spec.hpp"
#include "multigpu/runtime.hpp"

namespace multigpu {
namespace testing {

/// One scripted GPU. Position in FakeRuntime's list is its nvidia-smi number.
struct FakeGpu {
  /// The GPU's name.
  std::string name = "NVIDIA RTX A5000";
  /// Total memory (MiB).
  std::int64_t total_mib = 24564;
  /// Allocated by processes: nvidia-smi's "Used" (NVML v2's figure).
  std::int64_t used_mib = 0;
  /// Set aside by the driver and firmware: nvidia-smi's "Reserved". NVML's v1
  /// query counts it as used. See Note [Reserved memory] in detail/nvml.hpp.
  std::int64_t reserved_mib = 0;
  std::string pci_bus_id;  ///< Default: derived from the position.
  std::string uuid;        ///< Default: derived from the position.
  /// Compute capability, major.
  int cc_major = 8;
  /// Compute capability, minor.
  int cc_minor = 6;
  /// CUDA's default order (CUDA_DEVICE_ORDER=FASTEST_FIRST) lists faster GPUs
  /// first; with equal speed it keeps PCI order.
  int speed = 0;
  /// Compute processes on it (pid -> MiB, -1: NVML does not say), listed by
  /// NVML's process query; their memory counts as used, on top of used_mib.
  std::map<long, std::int64_t> process_mib;
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

  /// Memory allocated by processes on the GPU with this nvidia-smi number.
  FakeRuntime& set_used_mib(int nvml_index, std::int64_t mib) {
    std::lock_guard<std::mutex> lock(state_->mutex);
    state_->gpus.at(static_cast<std::size_t>(nvml_index)).used_mib = mib;
    return *this;
  }

  /// Memory the driver reserves on the GPU with this nvidia-smi number.
  FakeRuntime& set_reserved_mib(int nvml_index, std::int64_t mib) {
    std::lock_guard<std::mutex> lock(state_->mutex);
    state_->gpus.at(static_cast<std::size_t>(nvml_index)).reserved_mib = mib;
    return *this;
  }

  /// A compute process on the GPU with this nvidia-smi number: `pid` uses
  /// `mib` MiB (-1: NVML says "not available"); nullopt removes it. Its
  /// memory counts as used. Real pids (a task's shell, `$$`) let a test stand
  /// for a task that reached its GPU.
  FakeRuntime& set_process_mib(int nvml_index, long pid, std::optional<std::int64_t> mib) {
    std::lock_guard<std::mutex> lock(state_->mutex);
    auto& processes = state_->gpus.at(static_cast<std::size_t>(nvml_index)).process_mib;
    if (mib) {
      processes[pid] = *mib;
    } else {
      processes.erase(pid);
    }
    return *this;
  }

  /// How the driver answers nvmlDeviceGetComputeRunningProcesses_v3: 0 (the
  /// default) with the scripted processes; an NVML error code (3
  /// NOT_SUPPORTED, ...): no process list.
  FakeRuntime& set_process_query(int status) {
    std::lock_guard<std::mutex> lock(state_->mutex);
    state_->process_status = status;
    return *this;
  }

  /// How the driver answers nvmlDeviceGetMemoryInfo_v2: 0 (the default) with
  /// the scripted figures; an NVML error code (3 NOT_SUPPORTED,
  /// 13 FUNCTION_NOT_FOUND, 25 ARGUMENT_VERSION_MISMATCH, ...); nullopt: the
  /// library has no such function (drivers before R510). NVML's v1 query
  /// always answers.
  FakeRuntime& set_memory_info_v2(std::optional<int> status) {
    std::lock_guard<std::mutex> lock(state_->mutex);
    state_->memory_v2_status = status;
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

  /// How many times release_cached_memory() was called.
  int cache_releases() const {
    std::lock_guard<std::mutex> lock(state_->mutex);
    return state_->cache_releases;
  }

  // --- the runtime policy ---------------------------------------------------

  /// The scripted machine's versions and GPUs (the runtime policy).
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

  /// The scripted GPUs this process sees, after the scripted CUDA_VISIBLE_DEVICES.
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

  /// A scripted environment variable; nullopt when not set.
  std::optional<std::string> getenv(const char* name) const {
    std::lock_guard<std::mutex> lock(state_->mutex);
    return env_locked(name);
  }

  /// Peer access as scripted.
  std::optional<bool> can_access_peer(int, int) {
    std::lock_guard<std::mutex> lock(state_->mutex);
    return state_->peer_access;
  }

  /// Counts the call (see cache_releases()); a scripted machine caches nothing.
  void release_cached_memory() {
    std::lock_guard<std::mutex> lock(state_->mutex);
    ++state_->cache_releases;
  }

 private:
  struct State {
    mutable std::mutex mutex;
    std::vector<FakeGpu> gpus;
    std::map<std::string, std::optional<std::string>> env;
    bool cuda_build = true;
    bool peer_access = true;
    std::optional<int> memory_v2_status = 0;
    int process_status = 0;
    int queries = 0;
    int cache_releases = 0;
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
    // The figures as the driver would give them, read as the real NVML's are.
    const auto total = static_cast<unsigned long long>(gpu.total_mib) << 20;
    const auto reserved = static_cast<unsigned long long>(gpu.reserved_mib) << 20;
    std::int64_t process_total_mib = 0;
    for (const auto& [pid, mib] : gpu.process_mib) process_total_mib += std::max<std::int64_t>(mib, 0);
    const auto used = static_cast<unsigned long long>(gpu.used_mib + process_total_mib) << 20;
    const auto taken = std::min(total, reserved + used);
    std::function<int(detail::NvmlMemoryV2&)> v2;
    if (const auto status = state_->memory_v2_status) {
      v2 = [&, status = *status](detail::NvmlMemoryV2& memory) {
        if (status != 0) return status;
        if (memory.version != detail::kNvmlMemoryV2Version) return 25;  // NVML_ERROR_ARGUMENT_VERSION_MISMATCH
        memory.total = total;
        memory.reserved = reserved;
        memory.used = used;
        memory.free = total - taken;
        return 0;
      };
    }
    const auto figures = detail::read_nvml_memory(v2, [&](detail::NvmlMemoryV1& memory) {
      memory.total = total;
      memory.used = taken;
      memory.free = total - taken;
      return 0;
    });
    out.total_bytes = figures.total_bytes;
    out.used_bytes = figures.in_use_bytes;
    out.reserved_bytes = figures.reserved_bytes;
    out.memory_query = figures.query;
    out.nvml_index = static_cast<int>(nvml_index);
    // Answered as NVML's _v3 query would be, read as the real one's is.
    out.processes = detail::read_nvml_processes(
        [&](unsigned int& count, detail::NvmlProcessInfoV2* infos) {
          if (state_->process_status != 0) return state_->process_status;
          if (count < gpu.process_mib.size()) {
            count = static_cast<unsigned int>(gpu.process_mib.size());
            return 7;  // NVML_ERROR_INSUFFICIENT_SIZE
          }
          count = 0;
          for (const auto& [pid, mib] : gpu.process_mib) {
            infos[count].pid = static_cast<unsigned int>(pid);
            infos[count].used_gpu_memory =
                mib < 0 ? detail::kNvmlValueNotAvailable : static_cast<unsigned long long>(mib) << 20;
            ++count;
          }
          return 0;
        },
        {});
    return out;
  }

  std::shared_ptr<State> state_;
};

}  // namespace testing
}  // namespace multigpu
