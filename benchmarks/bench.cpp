// multigpu's benchmarks, measured side by side in one run:
//   1. training step time: a plain LibTorch loop on one device vs
//      DataParallel with 1 replica vs K replicas (and, with CUDA,
//      torch::nn::parallel::data_parallel on the first device, on it twice
//      and on the whole pool), on the models of benchmarks/models.hpp; with
//      the exposed (not overlapped) gradient-sync time for K > 1;
//   2. all-reduce bandwidth of each backend over message sizes, next to the
//      memory-copy bandwidth of the same device;
//   3. the compile-time cost of #include <multigpu/multigpu.hpp> in a
//      translation unit that already includes <torch/torch.h>.
// Writes JSON and a markdown table (benchmarks/plot.sh draws the JSON) and
// prints the targets as ratios from this run.
//
//   bench                          # everything, on GPUs if any, else CPU
//   bench --quick                  # a few steps of each, to see it works
//   bench --only steps --models cnn --replicas 1,2
//   bench --models resnet18,transformer-lm --batch resnet18=128
//
// Every contender starts a step from the same batch, already on the first
// device, and none reads its loss: the device is synchronised around each
// timed round only (StepLoss does not wait for the device; see step_loss.hpp).

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <CLI/CLI.hpp>
#include <fmt/core.h>
#include <nlohmann/json.hpp>
#include <torch/torch.h>
#include <unistd.h>

#include <multigpu/multigpu.hpp>

#include "bench_config.hpp"  // compiler and flags for the compile-time benchmark
#include "models.hpp"

#if MULTIGPU_WITH_CUDA
#include <torch/nn/parallel/data_parallel.h>  // not part of <torch/torch.h> in LibTorch 2.x; needs CUDA's headers
#endif

namespace {

using Clock = std::chrono::steady_clock;
using Json = nlohmann::json;

double seconds_since(Clock::time_point start) { return std::chrono::duration<double>(Clock::now() - start).count(); }

double median(std::vector<double> values) {
  if (values.empty()) return 0;
  std::sort(values.begin(), values.end());
  const std::size_t n = values.size();
  return n % 2 == 1 ? values[n / 2] : 0.5 * (values[n / 2 - 1] + values[n / 2]);
}

void synchronize(const c10::Device& device) {
#if MULTIGPU_WITH_CUDA
  if (device.is_cuda()) torch::cuda::synchronize(device.index());
#else
  (void)device;
#endif
}

// --- 1. training steps ----------------------------------------------------------

/// One way of running a training step, timed in rounds interleaved with the others.
struct Contender {
  std::string name;
  std::size_t replicas = 1;
  std::function<void()> step;
  std::function<std::optional<multigpu::SyncStats>()> sync_stats;
  std::function<std::vector<std::int64_t>()> optimizer_state_bytes;  // per replica
  c10::Device device{c10::kCPU};
  std::vector<double> round_step_ms;
  std::vector<multigpu::SyncStats> stats;
};

template <class Holder>
std::vector<Contender> contenders_for(const torch::data::Example<>& batch, const std::vector<c10::Device>& pool,
                                      const std::vector<std::size_t>& replica_counts) {
  using Module = typename Holder::ContainedType;
  using bench::make_model;
  std::vector<Contender> out;
  const c10::Device first = pool.front();
  auto cross_entropy = [](Module& net, const torch::data::Example<>& shard) {
    return bench::cross_entropy(net.forward(shard.data), shard.target);
  };

  {  // The plain LibTorch loop a user would write for one device.
    auto model = std::make_shared<Holder>(make_model<Holder>());
    (*model)->to(first);
    auto optimizer = std::make_shared<torch::optim::SGD>((*model)->parameters(),
                                                         torch::optim::SGDOptions(0.01).momentum(0.9));
    auto data = std::make_shared<torch::data::Example<>>(batch.data.to(first), batch.target.to(first));
    Contender plain;
    plain.name = "plain LibTorch";
    plain.device = first;
    plain.step = [model, optimizer, data, cross_entropy] {
      optimizer->zero_grad();
      cross_entropy(**model, *data).backward();
      optimizer->step();
    };
    out.push_back(std::move(plain));
  }

  for (std::size_t k : replica_counts) {
    std::vector<c10::Device> devices;
    for (std::size_t r = 0; r < k; ++r) devices.push_back(pool[r % pool.size()]);
    // Side by side: each replica with the whole optimizer state, and (with
    // several replicas) with its share only (Note [Sharded optimizer state]).
    for (const bool sharded : {false, true}) {
      if (sharded && k == 1) continue;
      multigpu::DataParallelOptions options;
      options.shard_optimizer_state = sharded;
      auto dp = std::make_shared<multigpu::DataParallel<Holder>>(make_model<Holder>(), devices, options);
      dp->template make_optimizer<torch::optim::SGD>(torch::optim::SGDOptions(0.01).momentum(0.9));
      auto data = std::make_shared<torch::data::Example<>>(batch.data.to(first), batch.target.to(first));
      Contender contender;
      contender.name = fmt::format("DataParallel({}){}", k, sharded ? ", sharded optimizer state" : "");
      contender.replicas = k;
      contender.device = first;
      contender.step = [dp, data, cross_entropy] { (void)dp->train_step(*data, cross_entropy); };
      contender.sync_stats = [dp] { return dp->last_sync_stats(); };
      contender.optimizer_state_bytes = [dp] { return dp->optimizer_state_bytes(); };
      out.push_back(std::move(contender));
    }
  }

#if MULTIGPU_WITH_CUDA
  if (first.is_cuda()) {
    // LibTorch's own data_parallel: on one device it calls the module; on
    // more (the same GPU twice included) it replicates the module every step.
    std::vector<std::vector<c10::Device>> layouts = {{first}, {first, first}};
    if (pool.size() > 1) layouts.push_back(pool);
    for (const auto& layout : layouts) {
      auto model = std::make_shared<Holder>(make_model<Holder>());
      (*model)->to(first);
      auto optimizer = std::make_shared<torch::optim::SGD>((*model)->parameters(),
                                                           torch::optim::SGDOptions(0.01).momentum(0.9));
      auto data = std::make_shared<torch::data::Example<>>(batch.data.to(first), batch.target.to(first));
      Contender theirs;
      std::string names;
      for (const auto& d : layout) names += (names.empty() ? "" : ",") + d.str();
      theirs.name = fmt::format("torch::nn::parallel::data_parallel({})", names);
      theirs.replicas = layout.size();
      theirs.device = first;
      theirs.step = [model, optimizer, data, layout] {
        optimizer->zero_grad();
        const torch::Tensor output = torch::nn::parallel::data_parallel(*model, data->data, layout);
        bench::cross_entropy(output, data->target).backward();
        optimizer->step();
      };
      out.push_back(std::move(theirs));
    }
  }
#endif
  return out;
}

Json run_step_benchmarks(const std::vector<c10::Device>& pool, const std::vector<std::size_t>& replica_counts,
                         const std::vector<std::string>& models, const std::map<std::string, std::int64_t>& batches,
                         int warmup, int rounds, int steps) {
  Json results = Json::array();
  for (const auto& workload : bench::workloads()) {
    if (std::find(models.begin(), models.end(), workload.name) == models.end()) continue;
    const std::int64_t batch_size = batches.at(workload.name);
    torch::manual_seed(1);
    const auto batch = workload.make_batch(batch_size);
    std::vector<Contender> contenders;
    std::int64_t parameters = 0;
    bench::with_model_type(workload.name, [&](auto type) {
      using Holder = typename decltype(type)::type;
      parameters = bench::parameter_count(*bench::make_model<Holder>());
      contenders = contenders_for<Holder>(batch, pool, replica_counts);
    });
    fmt::print("steps: {} ({}, {} parameters), batch {}, {} contenders, {} rounds of {} steps\n", workload.name,
               workload.description, parameters, batch_size, contenders.size(), rounds, steps);
    for (auto& c : contenders) {
      for (int i = 0; i < warmup; ++i) c.step();
      synchronize(c.device);
    }
    // Interleaved rounds, each starting with the next contender: slow drifts
    // of the machine, and whatever running first or second costs, hit every
    // contender alike.
    for (int round = 0; round < rounds; ++round) {
      for (std::size_t turn = 0; turn < contenders.size(); ++turn) {
        auto& c = contenders[(turn + static_cast<std::size_t>(round)) % contenders.size()];
        const auto start = Clock::now();
        for (int i = 0; i < steps; ++i) {
          c.step();
          if (c.sync_stats) {
            if (auto stats = c.sync_stats()) c.stats.push_back(*stats);
          }
        }
        synchronize(c.device);
        c.round_step_ms.push_back(1000.0 * seconds_since(start) / steps);
      }
    }
    const double plain_ms = median(contenders.front().round_step_ms);
    for (auto& c : contenders) {
      const double ms = median(c.round_step_ms);
      Json entry = {{"model", workload.name},
                    {"parameters", parameters},
                    {"batch_size", batch_size},
                    {"contender", c.name},
                    {"replicas", c.replicas},
                    {"step_ms", ms},
                    {"round_step_ms", c.round_step_ms},
                    {"samples_per_second", 1000.0 * static_cast<double>(batch_size) / ms},
                    {"ratio_to_plain", ms / plain_ms}};
      std::string state;
      if (c.optimizer_state_bytes) {
        const auto bytes = c.optimizer_state_bytes();
        entry["optimizer_state_bytes"] = bytes;
        state = fmt::format("  optimizer state {:.2f} MiB on replica 0", static_cast<double>(bytes.at(0)) / (1 << 20));
      }
      if (!c.stats.empty()) {
        std::vector<double> exposed, last, total;
        for (const auto& s : c.stats) {
          exposed.push_back(s.exposed_ms);
          last.push_back(s.last_bucket_ms);
          total.push_back(s.total_ms);
        }
        const auto& buckets = c.stats.front().buckets;
        entry["sync"] = {{"buckets", buckets},
                         {"exposed_ms", median(exposed)},
                         {"last_bucket_ms", median(last)},
                         {"total_allreduce_ms", median(total)},
                         {"exposed_below_last_bucket_plus_10pct_step",
                          median(exposed) < median(last) + 0.1 * ms}};
      }
      fmt::print("  {:<48} {:>9.3f} ms/step {:>9.0f} samples/s  x{:.3f} of plain{}\n", c.name, ms,
                 entry["samples_per_second"].get<double>(), ms / plain_ms, state);
      results.push_back(entry);
    }
  }
  return results;
}

// --- 2. all-reduce and copy bandwidth ------------------------------------------------

/// Times `op` until it has run for `budget` seconds (at least `min_runs`), returns the median seconds.
double time_op(const std::function<void()>& op, const c10::Device& device, double budget, int min_runs) {
  op();  // warm-up: page faults, caches
  synchronize(device);
  std::vector<double> times;
  const auto start = Clock::now();
  while (static_cast<int>(times.size()) < min_runs || (seconds_since(start) < budget && times.size() < 1000)) {
    const auto t0 = Clock::now();
    op();
    synchronize(device);
    times.push_back(seconds_since(t0));
  }
  return median(times);
}

Json run_bandwidth_benchmarks(const std::vector<c10::Device>& pool, const std::vector<std::int64_t>& sizes,
                              const std::vector<std::size_t>& replica_counts, double budget) {
  Json results = Json::array();
  const c10::Device device = pool.front();
  for (std::int64_t bytes : sizes) {
    const std::int64_t numel = bytes / 4;
    auto src = torch::rand({numel}, torch::TensorOptions().device(device));
    auto dst = torch::empty_like(src);
    const double copy_s = time_op([&] { dst.copy_(src); }, device, budget, 5);
    double memcpy_s = 0;
    if (device.is_cpu()) {
      memcpy_s = time_op(
          [&] { std::memcpy(dst.data_ptr<float>(), src.data_ptr<float>(), static_cast<std::size_t>(bytes)); }, device,
          budget, 5);
    }
    const double copy_seconds = memcpy_s > 0 ? std::min(copy_s, memcpy_s) : copy_s;
    const double copy_gbps = static_cast<double>(bytes) / copy_seconds / 1e9;
    Json entry = {{"bytes", bytes}, {"device", device.str()}, {"copy_gbps", copy_gbps},
                  {"aten_copy_gbps", static_cast<double>(bytes) / copy_s / 1e9}};
    if (memcpy_s > 0) entry["memcpy_gbps"] = static_cast<double>(bytes) / memcpy_s / 1e9;
    Json backends = Json::array();
    Json compressed = Json::array();  // the same bucket through each format (Note [Compressed gradients])
    for (std::size_t k : replica_counts) {
      if (k < 2) continue;
      std::vector<multigpu::ReplicaContext> contexts;
      std::vector<c10::Device> devices;
      for (std::size_t r = 0; r < k; ++r) {
        devices.push_back(pool[r % pool.size()]);
        contexts.emplace_back(devices.back());
      }
      std::vector<std::string> backend_names = {"local"};
      if (multigpu::choose_backend(devices, "auto") == "nccl") backend_names.push_back("nccl");
      for (const auto& backend : backend_names) {
        auto comm = multigpu::make_communicator(contexts, backend);
        std::vector<torch::Tensor> tensors;
        for (std::size_t r = 0; r < k; ++r) tensors.push_back(torch::rand({numel}, torch::TensorOptions().device(devices[r])));
        const double s = time_op(
            [&] {
              comm->all_reduce(tensors, multigpu::ReduceOp::kAverage);
              comm->wait(std::chrono::minutes(1));
            },
            device, budget, 3);
        const double algbw = static_cast<double>(bytes) / s / 1e9;
        const double busbw = algbw * 2.0 * static_cast<double>(k - 1) / static_cast<double>(k);
        // Every buffer is read and written once at least: 2K bytes of memory
        // traffic per byte of message, against a copy's 2.
        const double traffic_gbps = static_cast<double>(k) * algbw;
        backends.push_back({{"backend", backend},
                            {"replicas", k},
                            {"seconds", s},
                            {"algbw_gbps", algbw},
                            {"busbw_gbps", busbw},
                            {"memory_traffic_ratio_to_copy", traffic_gbps / copy_gbps}});
        compressed.push_back({{"backend", backend}, {"replicas", k}, {"format", "fp32"}, {"bytes_moved", bytes},
                              {"ms_per_bucket", s * 1e3}});
        for (const auto& hook : {multigpu::bf16_compress_hook(), multigpu::fp16_compress_hook()}) {
          const double hook_s = time_op(
              [&] {
                hook->all_reduce_average(*comm, tensors);
                comm->wait(std::chrono::minutes(1));
              },
              device, budget, 3);
          compressed.push_back({{"backend", backend},
                                {"replicas", k},
                                {"format", hook->name() == "bf16_compress" ? "bf16" : "fp16"},
                                {"bytes_moved", bytes / 2},
                                {"ms_per_bucket", hook_s * 1e3}});
        }
      }
    }
    entry["allreduce"] = backends;
    entry["compressed"] = compressed;
    std::string line = fmt::format("  {:>10} copy {:7.2f} GB/s", bytes, copy_gbps);
    for (const auto& b : backends) {
      line += fmt::format(" | {} x{} algbw {:6.2f} GB/s ({:.0f}% of copy traffic)", b["backend"].get<std::string>(),
                          b["replicas"].get<std::size_t>(), b["algbw_gbps"].get<double>(),
                          100 * b["memory_traffic_ratio_to_copy"].get<double>());
    }
    fmt::print("{}\n", line);
    std::string formats = fmt::format("  {:>10} per bucket:", bytes);
    for (const auto& c : compressed) {
      formats += fmt::format(" | {} x{} {} {} B {:.3f} ms", c["backend"].get<std::string>(), c["replicas"].get<std::size_t>(),
                             c["format"].get<std::string>(), c["bytes_moved"].get<std::int64_t>(),
                             c["ms_per_bucket"].get<double>());
    }
    fmt::print("{}\n", formats);
    results.push_back(entry);
  }
  return results;
}

// --- 3. compile time --------------------------------------------------------------------

Json run_compile_benchmark(int repeats, const std::string& scratch) {
  const std::string plain_tu = scratch + "/compile_torch.cpp";
  const std::string ours_tu = scratch + "/compile_torch_multigpu.cpp";
  std::ofstream(plain_tu) << "#include <torch/torch.h>\nint main() { return 0; }\n";
  std::ofstream(ours_tu) << "#include <torch/torch.h>\n#include <multigpu/multigpu.hpp>\nint main() { return 0; }\n";
  auto compile = [&](const std::string& tu) {
    const std::string command =
        fmt::format("{} {} -c {} -o {}.o", bench_config::kCxx, bench_config::kCxxFlags, tu, tu);
    const auto start = Clock::now();
    if (std::system(command.c_str()) != 0) throw std::runtime_error("compile failed: " + command);
    return seconds_since(start);
  };
  std::vector<double> plain, ours;
  for (int i = 0; i < repeats; ++i) {  // interleaved
    plain.push_back(compile(plain_tu));
    ours.push_back(compile(ours_tu));
  }
  const double ratio = median(ours) / median(plain);
  fmt::print("compile: torch/torch.h alone {:.2f} s, with multigpu.hpp {:.2f} s: x{:.3f}\n", median(plain),
             median(ours), ratio);
  return {{"torch_only_seconds", plain}, {"with_multigpu_seconds", ours}, {"median_ratio", ratio}};
}

// --- the machine --------------------------------------------------------------------------

Json describe_machine(const multigpu::DeviceSelection& selection) {
  std::string cpu = "unknown CPU";
  std::ifstream cpuinfo("/proc/cpuinfo");
  for (std::string line; std::getline(cpuinfo, line);) {
    if (line.rfind("model name", 0) == 0) {
      cpu = line.substr(line.find(':') + 2);
      break;
    }
  }
  char host[256] = {};
  gethostname(host, sizeof(host) - 1);
  Json devices = Json::array();
  for (const auto& d : selection) devices.push_back(d.is_cpu() ? std::string("cpu") : d.label());
  double load[3] = {};
  const std::string load_average =
      getloadavg(load, 3) == 3 ? fmt::format("{:.2f} {:.2f} {:.2f}", load[0], load[1], load[2]) : "unknown";
  return {{"host", host},
          {"load_average", load_average},  // other work on a shared machine shows here
          {"cpu", cpu},
          {"hardware_threads", std::thread::hardware_concurrency()},
          {"torch_intraop_threads", at::get_num_threads()},
          {"libtorch", TORCH_VERSION},
          {"cuda", MULTIGPU_WITH_CUDA != 0},
          {"nccl", MULTIGPU_WITH_NCCL != 0},
          {"devices", devices}};
}

std::string markdown(const Json& report) {
  std::string md = fmt::format("# multigpu benchmarks\n\nMachine: {} ({} hardware threads, LibTorch {}), devices: {}.\n"
                               "Date: {}. All figures below come from this one run.\n\n",
                               report["machine"]["cpu"].get<std::string>(),
                               report["machine"]["hardware_threads"].get<unsigned>(),
                               report["machine"]["libtorch"].get<std::string>(), report["machine"]["devices"].dump(),
                               report["date"].get<std::string>());
  if (report.contains("steps")) {
    md += "## Training step\n\nParameters:";
    std::string last_model;
    for (const auto& e : report["steps"]) {
      if (e["model"] == last_model) continue;
      last_model = e["model"].get<std::string>();
      md += fmt::format(" {} {};", last_model, e["parameters"].get<std::int64_t>());
    }
    md.back() = '.';
    md += " Every contender starts each step from the same batch on the first device; none reads its loss.\n\n"
          "| model | batch | contender | ms/step | samples/s | x plain | exposed sync ms | last bucket ms |\n"
          "|---|---|---|---|---|---|---|---|\n";
    for (const auto& e : report["steps"]) {
      std::string exposed = "", last = "";
      if (e.contains("sync")) {
        exposed = fmt::format("{:.3f}", e["sync"]["exposed_ms"].get<double>());
        last = fmt::format("{:.3f}", e["sync"]["last_bucket_ms"].get<double>());
      }
      md += fmt::format("| {} | {} | {} | {:.3f} | {:.0f} | {:.3f} | {} | {} |\n", e["model"].get<std::string>(),
                        e["batch_size"].get<std::int64_t>(), e["contender"].get<std::string>(),
                        e["step_ms"].get<double>(), e["samples_per_second"].get<double>(),
                        e["ratio_to_plain"].get<double>(), exposed, last);
    }
    md += "\n";
  }
  if (report.contains("bandwidth")) {
    md += "## All-reduce and copy bandwidth\n\nalgbw = message bytes / time; busbw = algbw x 2(K-1)/K (NCCL's "
          "convention); copy = the best of ATen's copy_ and memcpy on the same device. An all-reduce of K buffers in "
          "one memory reads and writes each buffer at least once, so its memory traffic is 2K bytes per message "
          "byte against a copy's 2: \"% of copy\" is that traffic's rate over the copy's.\n\n"
          "| bytes | copy GB/s | backend | K | algbw GB/s | busbw GB/s | % of copy |\n|---|---|---|---|---|---|---|\n";
    for (const auto& e : report["bandwidth"]) {
      for (const auto& b : e["allreduce"]) {
        md += fmt::format("| {} | {:.2f} | {} | {} | {:.2f} | {:.2f} | {:.0f}% |\n", e["bytes"].get<std::int64_t>(),
                          e["copy_gbps"].get<double>(), b["backend"].get<std::string>(), b["replicas"].get<std::size_t>(),
                          b["algbw_gbps"].get<double>(), b["busbw_gbps"].get<double>(),
                          100 * b["memory_traffic_ratio_to_copy"].get<double>());
      }
    }
    md += "\n### Gradient buckets in each format\n\nOne bucket of fp32 gradients averaged as fp32 (the plain "
          "all-reduce) and through the bf16 and fp16 compression hooks (divide, cast, all-reduce, cast back); bytes "
          "moved per replica.\n\n| bucket bytes | backend | K | format | bytes moved | ms per bucket |\n"
          "|---|---|---|---|---|---|\n";
    for (const auto& e : report["bandwidth"]) {
      if (!e.contains("compressed")) continue;
      for (const auto& c : e["compressed"]) {
        md += fmt::format("| {} | {} | {} | {} | {} | {:.3f} |\n", e["bytes"].get<std::int64_t>(),
                          c["backend"].get<std::string>(), c["replicas"].get<std::size_t>(),
                          c["format"].get<std::string>(), c["bytes_moved"].get<std::int64_t>(),
                          c["ms_per_bucket"].get<double>());
      }
    }
    md += "\n";
  }
  if (report.contains("compile")) {
    md += fmt::format("## Compile time\n\n`#include <multigpu/multigpu.hpp>` after `<torch/torch.h>`: median {:.2f} s "
                      "against {:.2f} s, x{:.3f}.\n\n",
                      median(report["compile"]["with_multigpu_seconds"].get<std::vector<double>>()),
                      median(report["compile"]["torch_only_seconds"].get<std::vector<double>>()),
                      report["compile"]["median_ratio"].get<double>());
  }
  md += "## Targets\n\n";
  for (const auto& t : report["targets"]) {
    md += fmt::format("- {}: {} ({})\n", t["target"].get<std::string>(), t["met"].get<bool>() ? "met" : "NOT met",
                      t["measured"].get<std::string>());
  }
  return md;
}

Json evaluate_targets(const Json& report) {
  Json targets = Json::array();
  if (report.contains("steps")) {
    for (const auto& e : report["steps"]) {
      if (e["contender"] == "DataParallel(1)") {
        const double ratio = e["ratio_to_plain"].get<double>();
        targets.push_back({{"target", fmt::format("DataParallel(1) step time <= 1.02x plain ({})", e["model"].get<std::string>())},
                           {"met", ratio <= 1.02},
                           {"measured", fmt::format("x{:.3f}", ratio)}});
      }
      const std::string unsharded_name = fmt::format("DataParallel({})", e["replicas"].get<std::size_t>());
      const std::string sharded = unsharded_name + ", sharded optimizer state";
      if (e["contender"] == sharded) {
        for (const auto& unsharded : report["steps"]) {
          if (unsharded["model"] != e["model"] || unsharded["contender"] != unsharded_name) continue;
          const double ratio = e["step_ms"].get<double>() / unsharded["step_ms"].get<double>();
          targets.push_back(
              {{"target", fmt::format("{} step time <= 1.05x unsharded ({})", sharded, e["model"].get<std::string>())},
               {"met", ratio <= 1.05},
               {"measured", fmt::format("x{:.3f}", ratio)}});
        }
      }
      if (e.contains("sync")) {
        targets.push_back({{"target", fmt::format("exposed sync < last bucket + 10% of step ({}, {})",
                                                  e["model"].get<std::string>(), e["contender"].get<std::string>())},
                           {"met", e["sync"]["exposed_below_last_bucket_plus_10pct_step"].get<bool>()},
                           {"measured", fmt::format("exposed {:.3f} ms, last bucket {:.3f} ms, step {:.3f} ms",
                                                    e["sync"]["exposed_ms"].get<double>(),
                                                    e["sync"]["last_bucket_ms"].get<double>(), e["step_ms"].get<double>())}});
      }
    }
  }
  if (report.contains("bandwidth")) {
    for (const auto& e : report["bandwidth"]) {
      if (e["bytes"].get<std::int64_t>() < (1 << 20)) continue;
      for (const auto& b : e["allreduce"]) {
        if (b["backend"] != "local") continue;
        const double ratio = b["memory_traffic_ratio_to_copy"].get<double>();
        targets.push_back({{"target", fmt::format("local all-reduce >= 50% of copy bandwidth ({} bytes, K={})",
                                                  e["bytes"].get<std::int64_t>(), b["replicas"].get<std::size_t>())},
                           {"met", ratio >= 0.5},
                           {"measured", fmt::format("{:.0f}%", 100 * ratio)}});
      }
    }
  }
  if (report.contains("compile")) {
    const double ratio = report["compile"]["median_ratio"].get<double>();
    targets.push_back({{"target", "umbrella header adds <= 15% to a torch/torch.h TU"},
                       {"met", ratio <= 1.15},
                       {"measured", fmt::format("x{:.3f}", ratio)}});
  }
  return targets;
}

/// --replicas: counts separated by commas, each at least 1.
std::vector<std::size_t> parse_counts(const std::string& text) {
  std::vector<std::size_t> out;
  std::stringstream in(text);
  for (std::string item; std::getline(in, item, ',');) {
    const bool digits =
        !item.empty() && std::all_of(item.begin(), item.end(), [](unsigned char c) { return std::isdigit(c); });
    if (!digits || item.size() > 6 || std::stoul(item) == 0) {
      throw std::invalid_argument(fmt::format("--replicas {}: \"{}\" is not a replica count (1, 2, ...)", text, item));
    }
    out.push_back(static_cast<std::size_t>(std::stoul(item)));
  }
  if (out.empty()) throw std::invalid_argument(fmt::format("--replicas {}: no replica count given", text));
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"multigpu benchmarks: step time, all-reduce bandwidth, compile time (see the file comment)."};
  std::string spec = "auto";
  std::string replicas_text = "1,2,4";
  std::vector<std::string> models;  // empty: bench::default_models for the device
  std::vector<std::string> batch_items;
  std::vector<std::string> only = {"steps", "bandwidth", "compile"};
  std::string output_dir = bench_config::kResultsDir;
  std::string label;
  int warmup = 5, rounds = 11, steps = 10, compile_repeats = 5;
  double budget = 1.0;
  bool quick = false;
  app.add_option("--devices", spec, "Device pool (a device spec); replicas cycle over it")->capture_default_str();
  app.add_option("--replicas", replicas_text, "Replica counts to compare, e.g. 1,2,4")->capture_default_str();
  std::vector<std::string> model_names;
  for (const auto& w : bench::workloads()) model_names.push_back(w.name);
  app.add_option("--models", models,
                 "Models to time (several: mlp,cnn or mlp cnn); default: mlp,cnn,transformer on a CPU, all on GPUs")
      ->delimiter(',')
      ->check(CLI::IsMember(model_names));
  app.add_option("--batch", batch_items,
                 "Batch size: N for every model, or model=N (several: resnet18=128,transformer-lm=32); default: "
                 "per model and device kind (see benchmarks/models.hpp)")
      ->delimiter(',');
  app.add_option("--only", only, "Parts to run: steps, bandwidth, compile (several: steps,compile)")
      ->delimiter(',')
      ->check(CLI::IsMember({"steps", "bandwidth", "compile"}))
      ->capture_default_str();
  app.add_option("--warmup", warmup, "Warm-up steps per contender")->capture_default_str();
  app.add_option("--rounds", rounds, "Interleaved rounds (the median is reported)")->capture_default_str();
  app.add_option("--steps", steps, "Steps per round")->capture_default_str();
  app.add_option("--budget", budget, "Seconds per bandwidth measurement")->capture_default_str();
  app.add_option("--compile-repeats", compile_repeats, "Compiles of each TU")->capture_default_str();
  app.add_option("--output-dir", output_dir, "Where the JSON and markdown go")->capture_default_str();
  app.add_option("--label", label, "Name of the result files (default: from the machine)");
  app.add_flag("--quick", quick, "Tiny sizes and few repetitions: checks that it runs, measures nothing useful");
  CLI11_PARSE(app, argc, argv);
  std::map<std::string, std::int64_t> chosen_batches;
  try {
    chosen_batches = bench::parse_batches(batch_items);
  } catch (const std::invalid_argument& e) {
    fmt::print(stderr, "bench: {}\n", e.what());
    return 1;
  }

  // The results folder is made (or found unwritable) before anything is measured.
  std::error_code made;
  std::filesystem::create_directories(output_dir, made);
  if (made || access(output_dir.c_str(), W_OK) != 0) {
    fmt::print(stderr, "bench: --output-dir {}: cannot create or write it ({})\n", output_dir,
               made ? made.message() : std::string(std::strerror(errno)));
    return 1;
  }

  try {
    multigpu::DeviceManagerOptions device_options;
    device_options.allow_duplicates = true;
    multigpu::DeviceManager manager(device_options);
    const auto selection = manager.select(spec);
    const auto pool = selection.torch_devices();
    const auto replica_counts = parse_counts(replicas_text);
    const bool gpu = !selection.is_cpu();
    if (models.empty()) models = bench::default_models(gpu);
    const std::size_t most_replicas = *std::max_element(replica_counts.begin(), replica_counts.end());
    const auto batches = bench::batch_sizes(gpu, quick, most_replicas, chosen_batches);
    if (quick) {
      warmup = 1;
      rounds = 2;
      steps = 2;
      budget = 0.01;
      compile_repeats = 1;
    }
    auto has = [&](const char* part) { return std::find(only.begin(), only.end(), part) != only.end(); };

    Json report;
    report["machine"] = describe_machine(selection);
    const auto now = std::chrono::system_clock::to_time_t(std::chrono::system_clock::now());
    char date[32];
    std::strftime(date, sizeof(date), "%Y-%m-%d %H:%M", std::gmtime(&now));
    report["date"] = std::string(date) + " UTC";
    report["quick"] = quick;
    report["settings"] = {{"warmup", warmup}, {"rounds", rounds}, {"steps", steps}, {"replicas", replica_counts}};
    fmt::print("multigpu benchmarks on {} ({})\n", report["machine"]["cpu"].get<std::string>(), selection.describe());
    if (has("steps")) {
      report["steps"] = run_step_benchmarks(pool, replica_counts, models, batches, warmup, rounds, steps);
    }
    if (has("bandwidth")) {
      std::vector<std::int64_t> sizes;
      for (std::int64_t s = 4 << 10; s <= (quick ? (1 << 20) : (256 << 20)); s *= 4) sizes.push_back(s);
      report["bandwidth"] = run_bandwidth_benchmarks(pool, sizes, replica_counts, budget);
    }
    if (has("compile")) report["compile"] = run_compile_benchmark(compile_repeats, bench_config::kScratchDir);
    report["targets"] = evaluate_targets(report);

    if (label.empty()) {
      label = selection.is_cpu() ? "cpu" : selection[0].name;
      for (char& c : label) {
        if (!std::isalnum(static_cast<unsigned char>(c))) c = '-';
      }
      label += quick ? "-quick" : "";
    }
    const std::string json_path = output_dir + "/" + label + ".json";
    const std::string md_path = output_dir + "/" + label + ".md";
    multigpu::detail::write_file_atomically(json_path, report.dump(2) + "\n");
    multigpu::detail::write_file_atomically(md_path, markdown(report));
    fmt::print("\n{}\nwrote {} and {}\n", markdown(report).substr(markdown(report).find("## Targets")), json_path,
               md_path);
    return 0;
  } catch (const std::exception& e) {
    fmt::print(stderr, "bench: {}\n", e.what());
    return 1;
  }
}
