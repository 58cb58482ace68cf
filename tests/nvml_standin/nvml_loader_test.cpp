// multigpu's real NVML loader (detail/nvml.hpp) over a stand-in for the
// driver's libnvidia-ml.so.1 (nvml_standin.cpp), found through
// LD_LIBRARY_PATH: the library is opened, every function bound, and the
// answers read as on a machine with GPUs. MULTIGPU_NVML_STANDIN says which
// stand-in ctest put first: "current" (v2 memory, _v3 process list) or "old"
// (a driver before R510: the first versions only).

#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include <cstdlib>
#include <string>

#include "multigpu/detail/nvml.hpp"
#include "multigpu/runtime.hpp"

TEST_CASE("the NVML loader reads GPUs, memory and each GPU's processes from the driver's library") {
  const char* which = std::getenv("MULTIGPU_NVML_STANDIN");
  REQUIRE(which != nullptr);
  const bool current = std::string(which) == "current";
  const auto& nvml = multigpu::detail::Nvml::instance();
  INFO(nvml.unavailable_reason());
  REQUIRE(nvml.available());
  CHECK(nvml.driver_version() == "999.1-stand-in");
  const auto gpus = nvml.gpus();
  REQUIRE(gpus.size() == 2);
  CHECK(gpus[1].name == "Stand-in GPU 1");
  CHECK(gpus[1].uuid == "GPU-57a4d100-0000-4000-8000-000000000001");
  CHECK(gpus[1].pci_bus_id == "0000:19:00.0");
  CHECK(gpus[1].cc_major == 9);
  CHECK(gpus[1].memory.total_bytes == std::int64_t{81559} << 20);
  if (current) {  // v2: the driver's reserved memory apart, not in use
    CHECK(gpus[1].memory.query == "nvmlDeviceGetMemoryInfo_v2");
    CHECK(gpus[1].memory.in_use_bytes == std::int64_t{3072} << 20);
    CHECK(gpus[1].memory.reserved_bytes == std::int64_t{551} << 20);
  } else {  // v1 only: reserved memory counted as used, and the figures say so
    CHECK(gpus[1].memory.query == "nvmlDeviceGetMemoryInfo");
    CHECK(gpus[1].memory.in_use_bytes == std::int64_t{3072 + 551} << 20);
    CHECK(gpus[1].memory.reserved_bytes == -1);
  }
  // Processes: 40 on GPU 0 (more than the first buffer holds), two on GPU 1,
  // one of which NVML gives no memory for.
  REQUIRE(gpus[0].processes);
  CHECK(gpus[0].processes->size() == 40);
  CHECK(gpus[0].processes->back().pid == 1039);
  REQUIRE(gpus[1].processes);
  REQUIRE(gpus[1].processes->size() == 2);
  CHECK((*gpus[1].processes)[0].pid == 4242);
  CHECK((*gpus[1].processes)[0].used_bytes == std::int64_t{3072} << 20);
  CHECK((*gpus[1].processes)[1].used_bytes == -1);
  // And through the runtime, as the device manager and the scheduler get them.
  multigpu::SystemRuntime runtime;
  const auto info = runtime.info();
  CHECK(info.memory_source == "NVML");
  REQUIRE(info.machine_gpus.size() == 2);
  REQUIRE(info.machine_gpus[1].processes);
  CHECK(info.machine_gpus[1].processes->size() == 2);
}
