// Uses multigpu through the umbrella header and checks the build switches.
#include <multigpu/multigpu.hpp>

#include <cstdio>

int main() {
  static_assert(MULTIGPU_WITH_CUDA == 0 || MULTIGPU_WITH_CUDA == 1, "switch defined by the package");
  multigpu::set_log_handler([](multigpu::LogLevel, std::string_view) {});
  multigpu::DeviceManager devices;
  const auto chosen = devices.select("auto");
  std::printf("consumer: %s (MULTIGPU_WITH_CUDA=%d)\n", chosen.describe().c_str(), MULTIGPU_WITH_CUDA);
  return chosen.empty() ? 1 : 0;
}
