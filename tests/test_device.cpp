// Device specs, CUDA_VISIBLE_DEVICES, busy detection, the report and batch
// planning, on a scripted machine (FakeRuntime) and on this real one.

#include "support.hpp"  // first: see its comment

#include <cstdint>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include <unistd.h>

#include "multigpu/testing/fake_runtime.hpp"

using multigpu::BasicDeviceManager;
using multigpu::DeviceError;
using multigpu::DeviceManagerOptions;
using multigpu::DeviceSpec;
using multigpu::testing::FakeGpu;
using multigpu::testing::FakeRuntime;
using multigpu_test::CapturedLog;
using multigpu_test::contains;
using FakeManager = BasicDeviceManager<FakeRuntime>;

namespace {

std::vector<int> indices(const multigpu::DeviceSelection& selection) {
  std::vector<int> out;
  for (const auto& d : selection) out.push_back(d.index);
  return out;
}

std::vector<int> physical(const multigpu::DeviceSelection& selection) {
  std::vector<int> out;
  for (const auto& d : selection) out.push_back(d.physical_index);
  return out;
}

/// The machine of the seed story: 8 A5000s, 2,3,5,6 used by someone else.
FakeRuntime eight_gpus_four_busy() {
  auto machine = FakeRuntime::with_gpus(8);
  for (int busy : {2, 3, 5, 6}) machine.set_used_mib(busy, 9000);
  return machine;
}

}  // namespace

TEST_SUITE("device spec parsing") {
  TEST_CASE("valid specs") {
    CHECK(multigpu::parse_device_spec("auto").kind == DeviceSpec::Kind::kAuto);
    CHECK(multigpu::parse_device_spec(" AUTO ").kind == DeviceSpec::Kind::kAuto);
    const auto auto2 = multigpu::parse_device_spec("auto: 2");
    CHECK(auto2.kind == DeviceSpec::Kind::kAuto);
    CHECK(auto2.count == 2);
    CHECK(multigpu::parse_device_spec("all").kind == DeviceSpec::Kind::kAll);
    CHECK(multigpu::parse_device_spec("cuda").kind == DeviceSpec::Kind::kCuda);
    const auto cpu = multigpu::parse_device_spec("cpu");
    CHECK(cpu.kind == DeviceSpec::Kind::kCpu);
    CHECK(cpu.count == 1);
    CHECK(multigpu::parse_device_spec("cpu, CPU").count == 2);
    const auto list = multigpu::parse_device_spec(" 0, 1 ,4,\t7 ");
    CHECK(list.kind == DeviceSpec::Kind::kList);
    CHECK(list.gpus == std::vector<int>{0, 1, 4, 7});
    CHECK(multigpu::parse_device_spec("cuda:0,cuda:2").gpus == std::vector<int>{0, 2});
    CHECK(multigpu::parse_device_spec("CUDA:3, 1").gpus == std::vector<int>{3, 1});
    CHECK(multigpu::parse_device_spec("0,0").gpus == std::vector<int>{0, 0});  // duplicates: the manager decides
  }

  TEST_CASE("malformed specs give a DeviceError naming the spec and the valid forms") {
    struct Case {
      std::string spec;
      std::string problem;
    };
    const std::vector<Case> cases = {
        {"", "the spec is empty"},
        {"   ", "the spec is empty"},
        {"-1", "GPU numbers are 0 or more"},
        {"0,,1", "item 2 is empty"},
        {"0,", "item 2 is empty"},
        {",0", "item 1 is empty"},
        {"cuda:x", "is not a GPU number"},
        {"cuda:", "a GPU number is missing"},
        {"cuda:-2", "GPU numbers are 0 or more"},
        {"99999999999999999999", "GPU number is too large"},
        {"cuda:4294967296", "GPU number is too large"},
        {"auto:0", "needs a GPU count N of 1 or more"},
        {"auto:-1", "needs a GPU count N of 1 or more"},
        {"auto:x", "needs a GPU count N of 1 or more"},
        {"auto:", "needs a GPU count N of 1 or more"},
        {"auto,0", "is a whole spec"},
        {"0,all", "is a whole spec"},
        {"cpu:1", "a CPU has no number"},
        {"cpu,0", "CPU and GPUs cannot be mixed"},
        {"gpu0", "write GPUs as plain numbers"},
        {"0 1", "is not a GPU number"},
        {"1.5", "is not a GPU number"},
        {"+1", "is not a GPU number"},
        {"0x1", "is not a GPU number"},
        {"cuda:0:1", "is not a GPU number"},
        {"cuda,cuda", "inside a list"},
        {"\xc3\xa9", "is not a printable ASCII character"},               // é
        {"0,\xe4\xb8\x80", "byte 3 (0xe4) is not a printable ASCII character"},  // CJK
        {std::string("0\0" "1", 3), "byte 2 (0x00)"},
    };
    for (const auto& c : cases) {
      CAPTURE(c.spec);
      const std::string message = MULTIGPU_TEST_MESSAGE(DeviceError, multigpu::parse_device_spec(c.spec));
      CHECK(contains(message, "device spec \""));
      CHECK(contains(message, c.problem));
      CHECK(contains(message, "valid: auto, auto:N, all, cpu, cuda"));
    }
  }

  TEST_CASE("messages quote hostile input safely") {
    const std::string message =
        MULTIGPU_TEST_MESSAGE(DeviceError, multigpu::parse_device_spec(std::string("\x1b[31m\"x", 7)));
    CHECK(contains(message, "\"\\x1b[31m\\\"x\""));
  }

  TEST_CASE("random bytes either parse or throw DeviceError, never anything else") {
    std::mt19937 random(12345);
    const std::string alphabet = "0123456789,: -+autoAUTOcpucudaCUDAall\t\x01\xff\xc3";
    int parsed = 0;
    for (int round = 0; round < 20000; ++round) {
      std::string spec;
      const auto length = random() % 12;
      for (unsigned i = 0; i < length; ++i) spec += alphabet[random() % alphabet.size()];
      try {
        const auto result = multigpu::parse_device_spec(spec);
        ++parsed;
        for (int gpu : result.gpus) CHECK(gpu >= 0);
      } catch (const DeviceError&) {
      }
    }
    CHECK(parsed > 0);
  }
}

TEST_SUITE("CUDA_VISIBLE_DEVICES parsing") {
  using multigpu::parse_cuda_visible_devices;
  using Kind = multigpu::VisibleDeviceEntry::Kind;

  TEST_CASE("unset, empty and plain lists") {
    CHECK_FALSE(parse_cuda_visible_devices(false, "").set);
    const auto empty = parse_cuda_visible_devices(true, "");
    CHECK(empty.set);
    CHECK(empty.entries.empty());
    const auto list = parse_cuda_visible_devices(true, " 2, 5 ");
    REQUIRE(list.entries.size() == 2);
    CHECK(list.entries[0].index == 2);
    CHECK(list.entries[1].index == 5);
    CHECK(list.problem.empty());
  }

  TEST_CASE("UUIDs and MIG instances") {
    const auto uuids = parse_cuda_visible_devices(true, "GPU-8932f937,MIG-GPU-1/2/0");
    REQUIRE(uuids.entries.size() == 2);
    CHECK(uuids.entries[0].kind == Kind::kUuid);
    CHECK(uuids.entries[1].kind == Kind::kMig);
  }

  TEST_CASE("CUDA stops at the first invalid or repeated entry") {
    const auto cut = parse_cuda_visible_devices(true, "0,-1,1");
    REQUIRE(cut.entries.size() == 1);
    CHECK(cut.ignored == "-1,1");
    CHECK(contains(cut.problem, "entry 2 (\"-1\") is negative"));
    const auto repeated = parse_cuda_visible_devices(true, "1,0,1");
    CHECK(repeated.entries.size() == 2);
    CHECK(contains(repeated.problem, "repeats an earlier one"));
    const auto junk = parse_cuda_visible_devices(true, "abc");
    CHECK(junk.entries.empty());
    CHECK(contains(junk.problem, "neither a GPU number nor a GPU-/MIG- UUID"));
    CHECK(parse_cuda_visible_devices(true, "0,,1").entries.size() == 1);
  }

  TEST_CASE("applying it to a machine") {
    const std::vector<std::string> uuids = {"GPU-aaaa-1", "GPU-bbbb-2", "GPU-abcd-3"};
    std::string why;
    CHECK(multigpu::apply_cuda_visible_devices(parse_cuda_visible_devices(true, "2,0"), uuids, &why) ==
          std::vector<int>{2, 0});
    CHECK(multigpu::apply_cuda_visible_devices(parse_cuda_visible_devices(true, "GPU-bb,0"), uuids, &why) ==
          std::vector<int>{1, 0});
    CHECK(multigpu::apply_cuda_visible_devices(parse_cuda_visible_devices(true, "0,7,1"), uuids, &why) ==
          std::vector<int>{0});
    CHECK(contains(why, "names GPU 7, but the machine has 3 GPU(s)"));
    CHECK(multigpu::apply_cuda_visible_devices(parse_cuda_visible_devices(true, "GPU-a"), uuids, &why).empty());
    CHECK(contains(why, "matches several GPU(s)"));
    CHECK(multigpu::apply_cuda_visible_devices(parse_cuda_visible_devices(true, "0,GPU-aaaa"), uuids, &why) ==
          std::vector<int>{0});
    CHECK(contains(why, "names a GPU already listed"));
  }
}

TEST_SUITE("device manager on a scripted machine") {
  TEST_CASE("8 GPUs with 2,3,5,6 busy: \"0,1,4,7\" is accepted and \"auto\" picks exactly those") {
    CapturedLog log;
    FakeManager devices(eight_gpus_four_busy());
    const auto explicit_list = devices.select("0,1,4,7");
    CHECK(indices(explicit_list) == std::vector<int>{0, 1, 4, 7});
    CHECK(explicit_list.torch_devices()[2] == c10::Device("cuda:4"));
    const auto automatic = devices.select("auto");
    CHECK(indices(automatic) == std::vector<int>{0, 1, 4, 7});
    CHECK_FALSE(automatic.cpu_fallback);
    CHECK(log.warnings().empty());
  }

  TEST_CASE("\"auto:N\" picks the N freest GPUs, in logical order") {
    auto machine = eight_gpus_four_busy();
    machine.set_used_mib(0, 300).set_used_mib(1, 10).set_used_mib(4, 0).set_used_mib(7, 200);
    FakeManager devices(machine);
    CHECK(indices(devices.select("auto:2")) == std::vector<int>{1, 4});
    CHECK(indices(devices.select("auto:3")) == std::vector<int>{1, 4, 7});
    const std::string message = MULTIGPU_TEST_MESSAGE(DeviceError, devices.select("auto:5"));
    CHECK(contains(message, "asks for 5 free GPU(s), but only 4 of the 8 visible are free"));
    CHECK(contains(message, "cuda:2 9000 MiB (busy)"));
  }

  TEST_CASE("asking for a busy GPU by name works and warns") {
    CapturedLog log;
    FakeManager devices(eight_gpus_four_busy());
    CHECK(indices(devices.select("1,2")) == std::vector<int>{1, 2});
    REQUIRE(log.warnings().size() == 1);
    CHECK(contains(log.warnings()[0], "cuda:2 (physical 2, NVIDIA RTX A5000) is busy: 9000 MiB of 24564 MiB"));
    CHECK(indices(devices.select("all")).size() == 8);
    CHECK(log.warnings().size() == 5);
  }

  TEST_CASE("memory changes are seen at the next selection") {
    auto machine = FakeRuntime::with_gpus(2);
    FakeManager devices(machine);
    CHECK(indices(devices.select("auto")) == std::vector<int>{0, 1});
    machine.set_used_mib(0, 4000);  // someone else starts a job on GPU 0
    CHECK(indices(devices.select("auto")) == std::vector<int>{1});
  }

  TEST_CASE("the busy threshold is configurable") {
    DeviceManagerOptions options;
    options.busy_threshold_mib = 10000;
    FakeManager devices(eight_gpus_four_busy(), options);
    CHECK(devices.select("auto").size() == 8);
    options.busy_threshold_mib = 8999;
    devices.set_options(options);
    CHECK(devices.select("auto").size() == 4);
  }

  TEST_CASE("every GPU busy: \"auto\" refuses instead of piling onto someone else's GPU") {
    auto machine = FakeRuntime::with_gpus(2);
    machine.set_used_mib(0, 1000).set_used_mib(1, 2000);
    FakeManager devices(machine);
    const std::string message = MULTIGPU_TEST_MESSAGE(DeviceError, devices.select("auto"));
    CHECK(contains(message, "all 2 visible GPU(s) are busy"));
    CHECK(contains(message, "name GPUs to use them anyway"));
  }

  TEST_CASE("GPUs that are not visible are named with what is visible") {
    FakeManager devices(FakeRuntime::with_gpus(4));
    const std::string message = MULTIGPU_TEST_MESSAGE(DeviceError, devices.select("0,9"));
    CHECK(message ==
          "device spec \"0,9\": cuda:9 is not visible; visible: cuda:0..cuda:3 (CUDA_VISIBLE_DEVICES not set)");
    CHECK(contains(MULTIGPU_TEST_MESSAGE(DeviceError, devices.select("99")), "cuda:99 is not visible"));
  }

  TEST_CASE("duplicates only with the opt-in") {
    FakeManager devices(FakeRuntime::with_gpus(2));
    CHECK(contains(MULTIGPU_TEST_MESSAGE(DeviceError, devices.select("0,0")), "cuda:0 is listed twice"));
    CHECK(contains(MULTIGPU_TEST_MESSAGE(DeviceError, devices.select("cpu,cpu")), "2 CPU replicas need"));
    DeviceManagerOptions options;
    options.allow_duplicates = true;
    devices.set_options(options);
    CHECK(indices(devices.select("0,0,1")) == std::vector<int>{0, 0, 1});
    const auto cpus = devices.select("cpu,cpu,cpu");
    CHECK(cpus.size() == 3);
    CHECK(cpus.is_cpu());
    CHECK(cpus.describe() == "3 CPU replicas");
  }

  TEST_CASE("\"cuda\" is the first visible GPU, as in LibTorch") {
    auto machine = FakeRuntime::with_gpus(4);
    machine.set_env("CUDA_VISIBLE_DEVICES", "3,1");
    FakeManager devices(machine);
    const auto chosen = devices.select("cuda");
    REQUIRE(chosen.size() == 1);
    CHECK(chosen[0].index == 0);
    CHECK(chosen[0].physical_index == 3);
  }

  TEST_CASE("CUDA_VISIBLE_DEVICES=2,5 and spec \"0,1\" gives physical GPUs 2 and 5") {
    auto machine = FakeRuntime::with_gpus(8);
    machine.set_env("CUDA_VISIBLE_DEVICES", "2,5");
    FakeManager devices(machine);
    const auto chosen = devices.select("0,1");
    CHECK(indices(chosen) == std::vector<int>{0, 1});
    CHECK(physical(chosen) == std::vector<int>{2, 5});
    CHECK(chosen[1].nvml_index == 5);
    CHECK(chosen[1].visible_devices_token == "5");
    CHECK(chosen.describe() ==
          "2 GPUs: cuda:0 (physical 2, NVIDIA RTX A5000), cuda:1 (physical 5, NVIDIA RTX A5000)");
    const std::string message = MULTIGPU_TEST_MESSAGE(DeviceError, devices.select("5"));
    CHECK(contains(message, "cuda:5 is not visible (numbers in a spec are logical: physical GPU 5 is cuda:1 here)"));
    CHECK(contains(message, "visible: cuda:0..cuda:1 (CUDA_VISIBLE_DEVICES=\"2,5\")"));
    const auto report = devices.report("0,1");
    CHECK(contains(report.text(), "CUDA_VISIBLE_DEVICES  \"2,5\""));
    CHECK(contains(report.verdict, "cuda:1 (physical 5"));
  }

  TEST_CASE("CUDA_VISIBLE_DEVICES by UUID, and cut short by a bad entry") {
    auto machine = FakeRuntime::with_gpus(4);
    FakeManager devices(machine);
    const std::string uuid3 = devices.devices()[3].uuid;
    machine.set_env("CUDA_VISIBLE_DEVICES", uuid3 + ",1");
    const auto chosen = devices.select("all");
    CHECK(physical(chosen) == std::vector<int>{-1, 1});  // a UUID entry has no CUDA number
    CHECK(chosen[0].nvml_index == 3);
    CHECK(chosen[0].visible_devices_token == uuid3);
    machine.set_env("CUDA_DEVICE_ORDER", "PCI_BUS_ID");
    CHECK(physical(devices.select("all")) == std::vector<int>{3, 1});  // then CUDA's order is nvidia-smi's

    machine.set_env("CUDA_VISIBLE_DEVICES", "0,-1,1");
    CHECK(devices.select("all").size() == 1);
    const auto report = devices.report("all");
    CHECK(contains(report.text(), "CUDA reads CUDA_VISIBLE_DEVICES only up to the first bad entry"));
    CHECK(contains(report.text(), "ignored: \"-1,1\""));
  }

  TEST_CASE("CUDA_DEVICE_ORDER: CUDA numbers the fastest GPU first unless told PCI_BUS_ID") {
    std::vector<FakeGpu> gpus(3);
    gpus[0].name = "slow";
    gpus[1].name = "fast";
    gpus[1].speed = 2;
    gpus[2].name = "slow too";
    auto machine = FakeRuntime(gpus);
    FakeManager devices(machine);
    const auto fastest_first = devices.select("all");
    CHECK(fastest_first[0].name == "fast");
    CHECK(fastest_first[0].nvml_index == 1);
    CHECK(contains(devices.report().text(), "CUDA numbers these GPUs differently from nvidia-smi"));
    machine.set_env("CUDA_DEVICE_ORDER", "PCI_BUS_ID");
    const auto pci = devices.select("all");
    CHECK(pci[0].name == "slow");
    CHECK_FALSE(contains(devices.report().text(), "differently from nvidia-smi"));
  }

  TEST_CASE("no GPU: \"auto\" gives the CPU with one warning line, asking for GPUs is an error") {
    CapturedLog log;
    FakeManager devices{FakeRuntime()};
    const auto chosen = devices.select("auto");
    CHECK(chosen.is_cpu());
    CHECK(chosen.cpu_fallback);
    CHECK(chosen.torch_devices() == std::vector<c10::Device>{c10::Device("cpu")});
    REQUIRE(log.warnings().size() == 1);
    CHECK(contains(log.warnings()[0], "no GPU is visible"));
    CHECK(contains(log.warnings()[0], "falls back to the CPU"));
    CHECK(log.warnings()[0].find('\n') == std::string::npos);
    CHECK(devices.select("auto:2").is_cpu());

    for (const char* spec : {"0,1", "all", "cuda", "cuda:0"}) {
      CAPTURE(spec);
      const std::string message = MULTIGPU_TEST_MESSAGE(DeviceError, devices.select(spec));
      CHECK(contains(message, "asks for GPUs, but none is visible: "));
      CHECK(contains(message, "Use \"cpu\" to run on the CPU on purpose"));
    }
    CHECK(devices.select("cpu").is_cpu());
    CHECK(log.warnings().size() == 2);  // the two "auto" selections, nothing else

    DeviceManagerOptions strict;
    strict.allow_cpu_fallback = false;
    devices.set_options(strict);
    CHECK(contains(MULTIGPU_TEST_MESSAGE(DeviceError, devices.select("auto")), "none is visible"));
  }

  TEST_CASE("a CPU-only LibTorch on a GPU machine is named as the reason") {
    CapturedLog log;
    auto machine = FakeRuntime::with_gpus(4);
    machine.set_cuda_build(false);
    FakeManager devices(machine);
    CHECK(devices.select("auto").is_cpu());
    REQUIRE(log.warnings().size() == 1);
    CHECK(contains(log.warnings()[0], "built without CUDA, although the machine has 4 NVIDIA GPU(s)"));
    CHECK(contains(MULTIGPU_TEST_MESSAGE(DeviceError, devices.select("0")), "built without CUDA"));
    const auto text = devices.report().text();
    CHECK(contains(text, "CPU-only (no CUDA)"));
    CHECK(contains(text, "GPUs of this machine (NVML), unusable from this program"));
  }

  TEST_CASE("an empty CUDA_VISIBLE_DEVICES hides every GPU, and says so") {
    auto machine = FakeRuntime::with_gpus(2);
    machine.set_env("CUDA_VISIBLE_DEVICES", "");
    FakeManager devices(machine);
    CHECK(devices.devices().empty());
    CHECK(contains(MULTIGPU_TEST_MESSAGE(DeviceError, devices.select("0")),
                   "CUDA_VISIBLE_DEVICES=\"\" hides every GPU"));
    machine.set_env("CUDA_VISIBLE_DEVICES", "7");
    devices.refresh();
    CHECK(contains(devices.no_gpu_reason(), "names no GPU of this machine"));
  }

  TEST_CASE("idle datacenter GPUs are free: NVML's v2 query leaves driver-reserved memory out, v1 is the fallback") {
    // Idle GPUs as `nvidia-smi -q` shows them (see Note [Reserved memory] in
    // detail/nvml.hpp): an A100-SXM4-40GB with 620 MiB reserved and 4 MiB
    // used, an H100 80GB HBM3 with 551 MiB reserved and 0 MiB used, and an
    // H100 running someone's job.
    FakeGpu a100;
    a100.name = "NVIDIA A100-SXM4-40GB";
    a100.total_mib = 40960;
    a100.reserved_mib = 620;
    a100.used_mib = 4;
    FakeGpu h100;
    h100.name = "NVIDIA H100 80GB HBM3";
    h100.total_mib = 81559;
    h100.reserved_mib = 551;
    h100.used_mib = 0;
    FakeGpu taken = h100;
    taken.used_mib = 30000;
    FakeRuntime machine({a100, h100, taken});
    FakeManager devices(machine);  // the default threshold: more than 500 MiB in use is busy

    const auto& gpus = devices.devices();
    REQUIRE(gpus.size() == 3);
    CHECK(gpus[0].used_bytes == std::int64_t{4} << 20);
    CHECK(gpus[0].reserved_bytes == std::int64_t{620} << 20);
    CHECK(gpus[0].memory_query == "nvmlDeviceGetMemoryInfo_v2");
    CHECK(gpus[1].used_bytes == 0);
    CHECK(indices(devices.select("auto")) == std::vector<int>{0, 1});
    const std::string text = devices.report("auto").text();
    CHECK(contains(text, "fake (nvmlDeviceGetMemoryInfo_v2: driver-reserved memory not counted)"));
    CHECK_FALSE(contains(text, "v1 query"));

    // A driver without v2 (before R510), or one whose v2 refuses: v1 counts
    // the reserved memory as used, and both idle GPUs read busy.
    for (const std::optional<int> v2 : {std::optional<int>(), std::optional<int>(3), std::optional<int>(13),
                                        std::optional<int>(25)}) {
      CAPTURE(v2.value_or(-1));
      machine.set_memory_info_v2(v2);
      devices.refresh();
      CHECK(gpus[0].used_bytes == std::int64_t{624} << 20);
      CHECK(gpus[0].reserved_bytes == -1);
      CHECK(gpus[0].memory_query == "nvmlDeviceGetMemoryInfo");
      CHECK(gpus[1].used_bytes == std::int64_t{551} << 20);
      CHECK(gpus[0].busy);
      CHECK(gpus[1].busy);
      CHECK(contains(MULTIGPU_TEST_MESSAGE(DeviceError, devices.select("auto")), "all 3 visible GPU(s) are busy"));
      const std::string fallback = devices.report("auto").text();
      CHECK(contains(fallback, "fake (nvmlDeviceGetMemoryInfo: driver-reserved memory counted as used)"));
      CHECK(contains(fallback, "memory in use on cuda:0, cuda:1, cuda:2 was read with NVML's v1 query"));
      CHECK(contains(fallback, "update the driver (R510 or later) or raise DeviceManagerOptions::busy_threshold_mib"));
      DeviceManagerOptions lenient;
      lenient.busy_threshold_mib = 1024;
      FakeManager raised(machine, lenient);
      CHECK(indices(raised.select("auto")) == std::vector<int>{0, 1});
    }
  }

  TEST_CASE("memory in use from NVML's answers, whichever way a driver counts v2's \"used\"") {
    using multigpu::detail::NvmlMemoryV1;
    using multigpu::detail::NvmlMemoryV2;
    using multigpu::detail::read_nvml_memory;
    const auto v1 = [](NvmlMemoryV1& memory) {
      memory = {1000, 300, 700};
      return 0;
    };
    // As drivers report it: total = reserved + used + free.
    auto figures = read_nvml_memory(
        [](NvmlMemoryV2& memory) {
          CHECK(memory.version == (40u | (2u << 24)));
          memory.total = 1000;
          memory.reserved = 100;
          memory.used = 600;
          memory.free = 300;
          return 0;
        },
        v1);
    CHECK(figures.in_use_bytes == 600);
    CHECK(figures.reserved_bytes == 100);
    CHECK(figures.total_bytes == 1000);
    CHECK(figures.query == "nvmlDeviceGetMemoryInfo_v2");
    // As nvml.h describes it: `used` includes `reserved`.
    figures = read_nvml_memory(
        [](NvmlMemoryV2& memory) {
          memory.total = 1000;
          memory.reserved = 100;
          memory.used = 700;
          memory.free = 300;
          return 0;
        },
        v1);
    CHECK(figures.in_use_bytes == 600);
    // No v2, then no answer at all.
    figures = read_nvml_memory({}, v1);
    CHECK(figures.in_use_bytes == 700);
    CHECK(figures.reserved_bytes == -1);
    CHECK(figures.query == "nvmlDeviceGetMemoryInfo");
    figures = read_nvml_memory([](NvmlMemoryV2&) { return 999; }, [](NvmlMemoryV1&) { return 15; });
    CHECK(figures.in_use_bytes == -1);
    CHECK(figures.total_bytes == -1);
    CHECK(figures.query.empty());
  }

  TEST_CASE("the report shows devices, peers and a verdict") {
    auto machine = eight_gpus_four_busy();
    machine.set_peer_access(false);
    FakeManager devices(machine);
    const auto report = devices.report("auto");
    CHECK(report.ok);
    CHECK(report.devices.size() == 8);
    const std::string text = report.text();
    CHECK(contains(text, "GPUs visible to this process: 8"));
    CHECK(contains(text, "BUSY"));
    CHECK(contains(text, "Peer access"));
    CHECK(contains(text, "NCCL                  2.21.5"));
    CHECK(contains(text, "Verdict: OK: training will run on 4 GPUs: cuda:0"));
    const auto bad = devices.report("0,12");
    CHECK_FALSE(bad.ok);
    CHECK(contains(bad.text(), "Verdict: ERROR: device spec \"0,12\": cuda:12 is not visible"));
    const auto malformed = devices.report("0,,1");
    CHECK_FALSE(malformed.ok);
    CHECK(contains(malformed.error, "item 2 is empty"));
  }
}

TEST_CASE("why a CUDA LibTorch sees no GPU, in words") {
  using multigpu::detail::explain_cuda_failure;
  const auto no_driver = explain_cuda_failure(35, "CUDA driver version is insufficient for CUDA runtime version",
                                              13000, 0, "");
  CHECK(contains(no_driver, "LibTorch was built with CUDA 13.0, but no NVIDIA driver was found"));
  CHECK(contains(no_driver, "install the NVIDIA driver, or run on the CPU"));
  const auto old_driver = explain_cuda_failure(35, "insufficient", 13000, 12020, "535.104.05");
  CHECK(contains(old_driver, "NVIDIA driver 535.104.05 supports CUDA up to 12.2, but this LibTorch was built with "
                             "CUDA 13.0: update the driver to one for CUDA 13.0 or newer"));
  const auto no_device = explain_cuda_failure(100, "no CUDA-capable device is detected", 13000, 13000, "580.65");
  CHECK(contains(no_device, "NVIDIA driver 580.65 is installed, but it finds no NVIDIA GPU"));
  CHECK(explain_cuda_failure(999, "unknown error", 13000, 13000, "") == "cudaGetDeviceCount: unknown error (CUDA error 999)");
}

TEST_CASE("the manager's decisions are plain functions of what the runtime reported") {
  // BasicDeviceManager only asks its runtime; these take the answers.
  using namespace multigpu::detail;
  std::vector<multigpu::RuntimeGpu> reported(2);
  reported[0].name = "A";
  reported[0].uuid = "GPU-a";
  reported[0].nvml_index = 1;
  reported[0].used_bytes = std::int64_t{3000} << 20;
  reported[1].name = "B";
  reported[1].uuid = "GPU-b";
  reported[1].nvml_index = 3;
  reported[1].used_bytes = std::int64_t{10} << 20;
  const auto cvd = multigpu::parse_cuda_visible_devices(true, "5,GPU-b");
  const auto gpus = gpu_device_infos(reported, cvd, /*pci_order=*/true, /*busy_threshold_mib=*/1000);
  REQUIRE(gpus.size() == 2);
  CHECK(gpus[0].index == 0);
  CHECK(gpus[0].physical_index == 5);
  CHECK(gpus[0].visible_devices_token == "5");
  CHECK(gpus[0].busy);
  CHECK(gpus[1].physical_index == 3);  // a UUID entry: nvidia-smi's number, as CUDA_DEVICE_ORDER=PCI_BUS_ID
  CHECK(gpus[1].visible_devices_token == "GPU-b");
  CHECK_FALSE(gpus[1].busy);

  int asked = 0;
  const auto reason = [&] {
    ++asked;
    return std::string("none here");
  };
  const DeviceManagerOptions options;
  auto resolve = [&](const char* text, const std::vector<multigpu::DeviceInfo>& visible) {
    return resolve_device_spec(text, multigpu::parse_device_spec(text), visible, cvd, options, reason);
  };
  CHECK(indices(resolve("auto", gpus)) == std::vector<int>{1});
  const auto named = resolve("0", gpus);
  REQUIRE(named.warnings.size() == 1);
  CHECK(contains(named.warnings[0], "cuda:0 (physical 5, A) is busy: 3000 MiB of ? MiB"));
  CHECK(MULTIGPU_TEST_MESSAGE(DeviceError, resolve("4", gpus)) ==
        "device spec \"4\": cuda:4 is not visible; visible: cuda:0..cuda:1 (CUDA_VISIBLE_DEVICES=\"5,GPU-b\")");
  CHECK(asked == 0);  // the reason is asked for (from the runtime) only when no GPU is visible

  CHECK(resolve("cpu", {}).is_cpu());
  CHECK(asked == 0);
  const auto fallback = resolve("auto", {});
  CHECK(fallback.cpu_fallback);
  CHECK(asked == 1);
  REQUIRE(fallback.warnings.size() == 1);
  CHECK(contains(fallback.warnings[0], "no GPU is visible (none here)"));

  multigpu::RuntimeInfo cpu_only;
  cpu_only.cuda_build = false;
  CHECK(no_gpu_reason(cpu_only, multigpu::parse_cuda_visible_devices(false, "")) ==
        "this program's LibTorch was built without CUDA");
  CHECK(visible_summary(0, multigpu::parse_cuda_visible_devices(true, "")) ==
        "visible: no GPU (CUDA_VISIBLE_DEVICES=\"\")");
}

TEST_CASE("the real runtime of this machine") {
  CapturedLog log;
  multigpu::DeviceManager devices;
  const auto report = devices.report("auto");
  CHECK(report.ok);
  CHECK_FALSE(report.text().empty());
#if !MULTIGPU_WITH_CUDA
  // A CPU-only LibTorch sees no GPU, whatever the machine has: CPU only.
  CHECK(devices.devices().empty());
  const auto chosen = devices.select("auto");
  CHECK(chosen.is_cpu());
  CHECK(chosen.cpu_fallback);
  CHECK(log.warnings().size() == 1);
  CHECK(contains(report.verdict, "CPU: no GPU is visible"));
  CHECK_THROWS_AS(devices.select("0"), DeviceError);
#else
  if (devices.devices().empty()) {
    CHECK(devices.select("auto").is_cpu());
    if (access("/proc/driver/nvidia/version", F_OK) != 0) {
      // A CUDA LibTorch on a machine without the driver (CI): the report says so.
      MESSAGE("no GPU here: " << report.verdict);
      CHECK(contains(report.verdict, "LibTorch was built with CUDA"));
      CHECK(contains(report.verdict, "no NVIDIA driver was found"));
    }
  } else {
    CHECK(devices.select("cuda").size() == 1);
  }
#endif
}

TEST_SUITE("batch planning") {
  TEST_CASE("even splits spread the remainder over the first devices") {
    CHECK(multigpu::split_batch(10, 4) == std::vector<std::int64_t>{3, 3, 2, 2});
    CHECK(multigpu::split_batch(8, 4) == std::vector<std::int64_t>{2, 2, 2, 2});
    CHECK(multigpu::split_batch(2, 4) == std::vector<std::int64_t>{1, 1, 0, 0});
    CHECK(multigpu::split_batch(0, 3) == std::vector<std::int64_t>{0, 0, 0});
    CHECK_THROWS_AS(multigpu::split_batch(4, std::size_t{0}), multigpu::Error);
    CHECK_THROWS_AS(multigpu::split_batch(-1, 2), multigpu::Error);
  }

  TEST_CASE("weighted splits follow the weights and add up") {
    CHECK(multigpu::split_batch(10, std::vector<double>{1, 1}) == std::vector<std::int64_t>{5, 5});
    CHECK(multigpu::split_batch(12, std::vector<double>{2, 1, 1}) == std::vector<std::int64_t>{6, 3, 3});
    CHECK(multigpu::split_batch(10, std::vector<double>{1, 1, 1}) == std::vector<std::int64_t>{4, 3, 3});
    CHECK(multigpu::split_batch(7, std::vector<double>{0, 1}) == std::vector<std::int64_t>{0, 7});
    const std::string message =
        MULTIGPU_TEST_MESSAGE(multigpu::Error, multigpu::split_batch(4, std::vector<double>{0, 0}));
    CHECK(contains(message, "the weights add up to 0"));
    CHECK(contains(MULTIGPU_TEST_MESSAGE(multigpu::Error, multigpu::split_batch(4, std::vector<double>{1, -1})),
                   "weight 1 is -1"));
  }

  TEST_CASE("plan_batch keeps the effective batch with gradient accumulation") {
    // The seed story: effective batch 16 on 4 GPUs that hold 2 samples each.
    const auto plan = multigpu::plan_batch(16, 4, 2);
    CHECK(plan.accumulation_steps == 2);
    CHECK(plan.per_device == std::vector<std::vector<std::int64_t>>{{2, 2, 2, 2}, {2, 2, 2, 2}});
    CHECK(plan.describe() == "effective batch 16 = 2 accumulation steps x 8 (4 devices x 2)");

    const auto no_limit = multigpu::plan_batch(16, 4);
    CHECK(no_limit.accumulation_steps == 1);
    CHECK(no_limit.describe() == "effective batch 16 = 16 (4 devices x 4)");

    const auto uneven = multigpu::plan_batch(10, 4, 2);
    CHECK(uneven.accumulation_steps == 2);
    CHECK(uneven.micro_batch(0) + uneven.micro_batch(1) == 10);
    CHECK(uneven.largest_share() <= 2);

    const auto weighted = multigpu::plan_batch(30, 2, 10, {2, 1});
    std::int64_t total = 0;
    for (std::size_t s = 0; s < weighted.per_device.size(); ++s) total += weighted.micro_batch(s);
    CHECK(total == 30);
    CHECK(weighted.largest_share() <= 10);
    CHECK(weighted.accumulation_steps == 2);

    CHECK_THROWS_AS(multigpu::plan_batch(0, 4), multigpu::Error);
    CHECK_THROWS_AS(multigpu::plan_batch(8, 0), multigpu::Error);
    CHECK_THROWS_AS(multigpu::plan_batch(8, 2, -1), multigpu::Error);
    CHECK_THROWS_AS(multigpu::plan_batch(8, 2, 4, {1}), multigpu::Error);
    CHECK_THROWS_AS(multigpu::plan_batch(8, 2, 4, {0, 0}), multigpu::Error);
  }
}
