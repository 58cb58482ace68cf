// "Is my GPU setup right?": what LibTorch, CUDA and NCCL this program has,
// which GPUs it sees (logical and physical numbers, memory, busy or not),
// whether they reach each other directly, and what a device spec resolves to.
//
//   device_report                       # what "auto" gives
//   device_report --devices 0,1,4,7     # exits 1 if that cannot be satisfied
//   CUDA_VISIBLE_DEVICES=2,5 device_report --devices 0,1

#include <cstdint>
#include <iostream>
#include <string>

#include <CLI/CLI.hpp>

#include <multigpu/multigpu.hpp>

int main(int argc, char** argv) {
  CLI::App app{"Checks this machine's GPU setup for multigpu and resolves a device spec."};
  std::string spec = "auto";
  multigpu::DeviceManagerOptions options;
  app.add_option("-d,--devices", spec,
                 "Device spec to resolve: auto, auto:N, all, cpu, cuda, or GPU numbers like 0,1,4,7")
      ->capture_default_str();
  app.add_option("--busy-threshold", options.busy_threshold_mib,
                 "MiB in use above which a GPU counts as busy")
      ->capture_default_str()
      ->check(CLI::Range(0, 1000000000));
  app.add_flag("--allow-duplicates", options.allow_duplicates,
               "Allow a device more than once (several replicas on one device)");
  CLI11_PARSE(app, argc, argv);

  multigpu::DeviceManager devices(options);
  const multigpu::DeviceReport report = devices.report(spec);
  std::cout << report.text();
  return report.ok ? 0 : 1;
}
