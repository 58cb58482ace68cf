// libFuzzer target for the two device-naming languages: multigpu's device
// specs and CUDA_VISIBLE_DEVICES. The first input byte picks the parser.
// Contract: every input either parses or throws multigpu::DeviceError (the
// CUDA_VISIBLE_DEVICES parser never throws); a parse result is consistent;
// anything else (another exception, a crash, a sanitizer report) fails.

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>
#include <vector>

#include <multigpu/device_spec.hpp>

namespace {

[[noreturn]] void fail(const char* what) {
  __builtin_trap();  // libFuzzer reports it with the input that caused it
  (void)what;
}

void check_spec(std::string_view text) {
  multigpu::DeviceSpec spec;
  try {
    spec = multigpu::parse_device_spec(text);
  } catch (const multigpu::DeviceError& e) {
    const std::string message = e.what();
    if (message.rfind("device spec \"", 0) != 0) fail("message does not start with the spec");
    if (message.find("valid: auto") == std::string::npos) fail("message does not list the valid forms");
    for (unsigned char c : message) {
      if (c < 0x20 || c >= 0x7f) fail("message carries an unprintable byte");
    }
    return;
  }
  if (spec.text != text) fail("spec text not kept");
  switch (spec.kind) {
    case multigpu::DeviceSpec::Kind::kList: {
      if (spec.gpus.empty()) fail("empty GPU list accepted");
      std::string again;
      for (int gpu : spec.gpus) {
        if (gpu < 0) fail("negative GPU");
        again += (again.empty() ? "" : ",") + std::to_string(gpu);
      }
      if (multigpu::parse_device_spec(again).gpus != spec.gpus) fail("list does not round-trip");
      break;
    }
    case multigpu::DeviceSpec::Kind::kCpu:
      if (spec.count < 1) fail("no CPU replica");
      break;
    case multigpu::DeviceSpec::Kind::kAuto:
      if (spec.count < 0) fail("negative auto count");
      break;
    default:
      break;
  }
}

void check_visible_devices(std::string_view text) {
  const auto parsed = multigpu::parse_cuda_visible_devices(true, text);
  if (parsed.entries.empty() && parsed.problem.empty() && multigpu::detail::trim(text).size() > 0) {
    fail("a non-empty value with no entry and no problem");
  }
  if (!parsed.ignored.empty() && parsed.problem.empty()) fail("ignored part without a reason");
  if (!parsed.ignored.empty() && text.find(parsed.ignored) == std::string_view::npos) fail("ignored is not from the value");
  for (const auto& entry : parsed.entries) {
    if (entry.kind == multigpu::VisibleDeviceEntry::Kind::kIndex && entry.index < 0) fail("negative index");
    if (entry.text.empty()) fail("empty entry");
  }
  const std::vector<std::string> uuids = {"GPU-aaaa", "GPU-aabb", "GPU-cccc"};
  std::string why;
  const auto visible = multigpu::apply_cuda_visible_devices(parsed, uuids, &why);
  if (visible.size() > parsed.entries.size()) fail("more visible GPUs than entries");
  for (int position : visible) {
    if (position < 0 || position >= static_cast<int>(uuids.size())) fail("position outside the machine");
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size == 0) return 0;
  const std::string_view text(reinterpret_cast<const char*>(data + 1), size - 1);
  if (data[0] % 2 == 0) {
    check_spec(text);
  } else {
    check_visible_devices(text);
  }
  return 0;
}
