#pragma once
// Reading and writing checkpoints of a DataParallel: the module alone
// (dp.save / dp.load), the optimizer alone, and the whole training
// (dp.save_state / dp.load_state). See Note [Checkpoints] in
// multigpu/checkpoint.hpp for what they hold and guarantee.

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <map>
#include <mutex>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Context.h>
#include <fmt/core.h>
#include <torch/serialize/input-archive.h>
#include <torch/serialize/output-archive.h>

#include "multigpu/checkpoint.hpp"
#include "multigpu/detail/atomic_file.hpp"
#include "multigpu/data_parallel/core.hpp"
#include "multigpu/detail/module_state.hpp"
#include "multigpu/streams.hpp"
#include "multigpu/error.hpp"
#include "multigpu/sampler.hpp"

namespace multigpu {
namespace detail {

/// Keys of a training checkpoint's own parts (beside the module's).
inline constexpr const char* kCheckpointPrefix = "__multigpu_";
inline constexpr std::int64_t kCheckpointFormat = 1;

void save_module(DataParallelCore& core, const std::string& path);
void load_module(DataParallelCore& core, const std::string& path);
void save_optimizer(DataParallelCore& core, const std::string& path);
void load_optimizer(DataParallelCore& core, const std::string& path);
/// The sampler whose place a checkpoint records (see TrainingProgress).
void attach_sampler(DataParallelCore& core, const DistributedSampler& sampler);
void save_training_state(DataParallelCore& core, const std::string& path, const CheckpointExtras& extras);
ResumeInfo load_training_state(DataParallelCore& core, const std::string& path, CheckpointExtras& extras);

// ---------------------------------------------------------------------------
// Definitions

namespace checkpoint {

inline std::string key(const char* part) { return std::string(kCheckpointPrefix) + part; }

/// Every process's `values` summed, over the communicator (replica 0 of
/// each process gives its values, the others zeros). Collective.
inline std::vector<double> all_reduce_sum(DataParallelCore& core, const std::vector<double>& values) {
  if (core.options().processes == 1) return values;
  const auto cpu = at::tensor(values, at::kDouble);
  std::vector<at::Tensor> tensors;
  for (std::size_t r = 0; r < core.size(); ++r) {
    tensors.push_back(r == 0 ? cpu.to(core.device(r)) : at::zeros_like(cpu, cpu.options().device(core.device(r))));
  }
  core.comm().all_reduce(tensors, ReduceOp::kSum);
  const at::Tensor sum = tensors[0].to(at::kCPU);
  return {sum.data_ptr<double>(), sum.data_ptr<double>() + sum.numel()};
}

/// A value of each process, gathered: row k is rank k's. Collective.
inline std::vector<std::vector<double>> all_gather(DataParallelCore& core, const std::vector<double>& mine) {
  const auto processes = static_cast<std::size_t>(core.options().processes);
  if (processes == 1) return {mine};
  const auto rank = static_cast<std::size_t>(core.options().process_rank);
  std::vector<double> lengths(processes, 0.0);
  lengths[rank] = static_cast<double>(mine.size());
  lengths = all_reduce_sum(core, lengths);
  const auto width = static_cast<std::size_t>(*std::max_element(lengths.begin(), lengths.end()));
  std::vector<double> rows(processes * width, 0.0);
  std::copy(mine.begin(), mine.end(), rows.begin() + static_cast<std::ptrdiff_t>(rank * width));
  rows = all_reduce_sum(core, rows);
  std::vector<std::vector<double>> out(processes);
  for (std::size_t k = 0; k < processes; ++k) {
    const auto begin = rows.begin() + static_cast<std::ptrdiff_t>(k * width);
    out[k].assign(begin, begin + static_cast<std::ptrdiff_t>(lengths[k]));
  }
  return out;
}

/// This process's random states: the CPU generator's, then the GPU
/// generator's of each CUDA replica (undefined for CPU replicas).
inline std::vector<at::Tensor> local_random_states(const std::vector<c10::Device>& devices) {
  std::vector<at::Tensor> states;
  {
    auto cpu = at::detail::getDefaultCPUGenerator();
    const std::lock_guard<std::mutex> lock(cpu.mutex());
    states.push_back(cpu.get_state());
  }
  for (const auto& device : devices) {
    if (!device.is_cuda()) {
      states.emplace_back();
      continue;
    }
    auto generator = at::globalContext().defaultGenerator(device);
    const std::lock_guard<std::mutex> lock(generator.mutex());
    states.push_back(generator.get_state());
  }
  return states;
}

/// Every process's random states, by rank, as "rank{k}_cpu" and
/// "rank{k}_replica{r}" (CUDA replicas). Collective.
inline std::map<std::string, at::Tensor> gather_random_states(DataParallelCore& core) {
  // One row of doubles per process: [count, length..., bytes...].
  const std::vector<at::Tensor> states = local_random_states(core.devices());
  std::vector<double> row{static_cast<double>(states.size())};
  for (const auto& state : states) row.push_back(state.defined() ? static_cast<double>(state.numel()) : -1.0);
  for (const auto& state : states) {
    if (!state.defined()) continue;
    const auto* bytes = state.data_ptr<std::uint8_t>();
    row.insert(row.end(), bytes, bytes + state.numel());
  }
  std::map<std::string, at::Tensor> out;
  const auto rows = all_gather(core, row);
  for (std::size_t k = 0; k < rows.size(); ++k) {
    const auto count = static_cast<std::size_t>(rows[k].at(0));
    std::size_t offset = 1 + count;
    for (std::size_t i = 0; i < count; ++i) {
      const double length = rows[k].at(1 + i);
      if (length < 0) continue;
      at::Tensor state = at::empty({static_cast<std::int64_t>(length)}, at::kByte);
      auto* bytes = state.data_ptr<std::uint8_t>();
      for (std::int64_t b = 0; b < state.numel(); ++b) bytes[b] = static_cast<std::uint8_t>(rows[k][offset++]);
      out[i == 0 ? fmt::format("rank{}_cpu", k) : fmt::format("rank{}_replica{}", k, i - 1)] = state;
    }
  }
  return out;
}

inline at::Tensor bytes_tensor(const std::string& bytes) {
  at::Tensor tensor = at::empty({static_cast<std::int64_t>(bytes.size())}, at::kByte);
  if (!bytes.empty()) std::memcpy(tensor.data_ptr(), bytes.data(), bytes.size());
  return tensor;
}

inline std::string tensor_bytes(const at::Tensor& tensor) {
  const at::Tensor data = tensor.to(at::kCPU).contiguous();
  return std::string(static_cast<const char*>(data.data_ptr()), static_cast<std::size_t>(data.numel()));
}

/// The module's tensors (primary replica), checksummed in a fixed order.
inline void add_module(Checksum& sum, const std::vector<at::Tensor>& parameters, const std::vector<at::Tensor>& buffers) {
  for (const auto& tensor : parameters) sum.add(tensor);
  for (const auto& tensor : buffers) {
    if (tensor.defined()) sum.add(tensor);
  }
}

/// Throws on every rank when `failure` is not empty on any: this rank's own
/// failure, or `others` when it was another's. Collective.
inline void fail_together(DataParallelCore& core, const std::string& failure, const std::string& others) {
  const bool failed_here = !failure.empty();
  const bool failed = core.options().processes == 1
                          ? failed_here
                          : all_reduce_sum(core, {failed_here ? 1.0 : 0.0})[0] > 0;
  if (failed_here) throw CheckpointError(failure);
  if (failed) throw CheckpointError(others);
}

/// Every rank says whether it read `path` and what (a fingerprint); all go
/// on only when every rank read the same. Collective.
inline void agree(DataParallelCore& core, const std::string& what, const std::string& path,
                  const std::string& failure, std::uint64_t fingerprint) {
  const int processes = core.options().processes;
  if (processes == 1) {
    if (!failure.empty()) throw CheckpointError(failure);
    return;
  }
  const auto rank = static_cast<std::size_t>(core.options().process_rank);
  std::vector<double> rows(static_cast<std::size_t>(processes) * 3, 0.0);
  rows[rank * 3] = failure.empty() ? 1.0 : 0.0;
  rows[rank * 3 + 1] = static_cast<double>(fingerprint >> 32);
  rows[rank * 3 + 2] = static_cast<double>(fingerprint & 0xFFFFFFFFULL);
  rows = all_reduce_sum(core, rows);
  std::vector<int> failed;
  std::vector<int> different;
  for (int k = 0; k < processes; ++k) {
    const std::size_t at = static_cast<std::size_t>(k) * 3;
    if (rows[at] == 0.0) {
      failed.push_back(k);
    } else if (rows[0] != 0.0 && (rows[at + 1] != rows[1] || rows[at + 2] != rows[2])) {
      different.push_back(k);
    }
  }
  if (!failure.empty()) throw CheckpointError(failure);
  if (failed.empty() && different.empty()) return;
  auto list = [](const std::vector<int>& ranks) {
    std::string out;
    for (int k : ranks) out += (out.empty() ? "" : ", ") + std::to_string(k);
    return out;
  };
  std::string why;
  if (!failed.empty()) why = fmt::format("rank(s) {} could not read it (their output says why)", list(failed));
  if (!different.empty()) {
    why += fmt::format("{}rank(s) {} read another file there than rank 0 (another checksum)", why.empty() ? "" : "; ",
                       list(different));
  }
  throw CheckpointError(fmt::format("{} {}: {}; every rank stopped before changing anything, so that all resume from "
                                    "one checkpoint",
                                    what, path, why));
}

/// Opens `path` as an archive on the CPU; errors name the file and why.
inline torch::serialize::InputArchive open(const std::string& path, const char* what) {
  std::error_code error;
  if (!std::filesystem::exists(path, error)) throw CheckpointError(fmt::format("{}: there is no file {}", what, path));
  torch::serialize::InputArchive archive;
  try {
    archive.load_from(path, c10::Device(c10::kCPU));
  } catch (const c10::Error& e) {
    throw CheckpointError(fmt::format("{}: cannot read {} as a LibTorch checkpoint (damaged, or not written by "
                                      "torch::save): {}",
                                      what, path, e.what_without_backtrace()));
  }
  return archive;
}

/// write_file_atomically_with, whose file-system failures (plain Error)
/// become CheckpointError with the same message.
inline void write_atomically(const std::string& path, const std::function<void(FileSink&)>& produce) {
  try {
    write_file_atomically_with(path, produce);
  } catch (const CheckpointError&) {
    throw;
  } catch (const Error& e) {
    throw CheckpointError(e.what());
  }
}

/// Writes `archive` to `path` atomically; errors (a full disk too) name
/// `path` and why. See Note [A full disk fails a save, not the program].
inline void write(torch::serialize::OutputArchive& archive, const std::string& path) {
  check_checkpoint_path(path);
  write_atomically(path, [&](FileSink& sink) {
    try {
      archive.save_to([&sink](const void* data, std::size_t size) { return sink.write(data, size); });
    } catch (const c10::Error& e) {
      throw CheckpointError(fmt::format("cannot write the checkpoint {}: {}", path, e.what_without_backtrace()));
    }
  });
}

inline ModuleTensors read_module(DataParallelCore& core, torch::serialize::InputArchive& archive,
                                 const std::string& origin) {
  return read_module_tensors(archive, origin, core.parameter_names(), core.parameters(0), core.buffer_names(),
                             core.buffers(0), kCheckpointPrefix);
}

/// What a training checkpoint holds, read and checked, not applied yet.
struct Loaded {
  std::map<std::string, std::int64_t> meta;
  ModuleTensors module;
  std::map<std::string, std::string> optimizers;  // serialised, by name ("": made without a name)
  std::map<std::string, at::Tensor> random;
  CheckpointValues values;
  std::map<std::string, std::string> objects;  // serialised, by name
  std::uint64_t checksum = 0;
  ResumeInfo info;  // what it describes (the notes are added as it is applied)
};

/// An optimizer's name in messages.
inline std::string optimizer_text(const std::string& name) {
  return name.empty() ? std::string("the optimizer made without a name") : fmt::format("the optimizer \"{}\"", name);
}

/// The optimizers' states: the one made without a name as before named
/// ones existed (a checkpoint without them keeps its checksum), then each
/// named one with its name.
inline void add_optimizers(Checksum& sum, const std::map<std::string, std::string>& optimizers) {
  const auto unnamed = optimizers.find("");
  sum.add(unnamed == optimizers.end() ? std::string() : unnamed->second);
  for (const auto& [name, state] : optimizers) {
    if (name.empty()) continue;
    sum.add(name);
    sum.add(state);
  }
}

/// The checkpoint's description fields, checksummed in one order.
inline void add_meta(Checksum& sum, const std::map<std::string, std::int64_t>& meta) {
  for (const auto& [name, value] : meta) {
    sum.add(name);
    sum.add(value);
  }
}

inline void add_values(Checksum& sum, const std::map<std::string, c10::IValue>& values) {
  for (const auto& [name, value] : values) {
    sum.add(name);
    if (value.isTensor()) {
      sum.add(value.toTensor());
    } else if (value.isInt()) {
      sum.add(value.toInt());
    } else {
      const double number = value.toDouble();
      std::int64_t bits = 0;
      std::memcpy(&bits, &number, sizeof bits);
      sum.add(bits);
    }
  }
}

inline void add_objects(Checksum& sum, const std::map<std::string, std::string>& objects) {
  for (const auto& [name, bytes] : objects) {
    sum.add(name);
    sum.add(bytes);
  }
}

inline void add_random(Checksum& sum, const std::map<std::string, at::Tensor>& random) {
  for (const auto& [name, state] : random) {
    sum.add(name);
    sum.add(state);
  }
}

inline std::int64_t meta_value(const Loaded& loaded, const char* name, const std::string& path) {
  const auto found = loaded.meta.find(name);
  if (found == loaded.meta.end()) {
    throw CheckpointError(fmt::format("load_state: the checkpoint {} lacks its field {}: it is damaged", path, name));
  }
  return found->second;
}

inline Loaded read_training_state(DataParallelCore& core, const std::string& path) {
  const std::string origin = "load_state: the checkpoint " + path;
  torch::serialize::InputArchive archive = open(path, "load_state");
  Loaded loaded;
  c10::IValue format;
  if (!archive.try_read(key("format"), format) || !format.isInt()) {
    throw CheckpointError(fmt::format("load_state: {} is not a training checkpoint of multigpu (it has no {}); a "
                                      "module saved with torch::save or dp.save loads with dp.load",
                                      path, key("format")));
  }
  if (format.toInt() > kCheckpointFormat) {
    throw CheckpointError(fmt::format("load_state: {} has checkpoint format {}, this multigpu reads up to {}: it was "
                                      "written by a newer multigpu",
                                      path, format.toInt(), kCheckpointFormat));
  }
  torch::serialize::InputArchive part;
  if (!archive.try_read(key("meta"), part)) {
    throw CheckpointError(fmt::format("{} lacks its description: it is damaged", origin));
  }
  for (const std::string& name : part.keys()) {
    c10::IValue value;
    if (part.try_read(name, value) && value.isInt()) loaded.meta[name] = value.toInt();
  }
  loaded.module = read_module(core, archive, origin);
  at::Tensor optimizer;
  if (archive.try_read(key("optimizer"), optimizer, /*is_buffer=*/true)) loaded.optimizers[""] = tensor_bytes(optimizer);
  torch::serialize::InputArchive named;
  if (archive.try_read(key("optimizers"), named)) {
    for (const std::string& name : named.keys()) {
      if (named.try_read(name, optimizer, /*is_buffer=*/true)) loaded.optimizers[name] = tensor_bytes(optimizer);
    }
  }
  if (!loaded.optimizers.empty() && !core.has_optimizer()) {
    throw CheckpointError(fmt::format("{} holds an optimizer state, and this DataParallel has no optimizer yet: call "
                                      "make_optimizer<Opt>(options) before load_state, so that it is restored",
                                      origin));
  }
  const std::vector<std::string> made = core.optimizer_names();
  for (const auto& saved : loaded.optimizers) {
    if (std::find(made.begin(), made.end(), saved.first) != made.end()) continue;
    throw CheckpointError(fmt::format("{} holds the state of {}, and this DataParallel has no such optimizer: make it "
                                      "(make_optimizer) before load_state, so that it is restored",
                                      origin, optimizer_text(saved.first)));
  }
  torch::serialize::InputArchive random;
  if (archive.try_read(key("random"), random)) {
    for (const std::string& name : random.keys()) {
      at::Tensor state;
      if (random.try_read(name, state, /*is_buffer=*/true)) loaded.random[name] = state;
    }
  }
  torch::serialize::InputArchive values;
  if (archive.try_read(key("values"), values)) {
    std::vector<std::string> names = values.keys();
    std::sort(names.begin(), names.end());
    for (const std::string& name : names) {
      c10::IValue value;
      if (!values.try_read(name, value)) continue;
      if (value.isTensor()) {
        loaded.values.set(name, value.toTensor());
      } else if (value.isInt()) {
        loaded.values.set(name, value.toInt());
      } else if (value.isDouble()) {
        loaded.values.set(name, value.toDouble());
      }
    }
  }
  torch::serialize::InputArchive objects;
  if (archive.try_read(key("objects"), objects)) {
    for (const std::string& name : objects.keys()) {
      at::Tensor bytes;
      if (objects.try_read(name, bytes, /*is_buffer=*/true)) loaded.objects[name] = tensor_bytes(bytes);
    }
  }
  c10::IValue stored;
  if (!archive.try_read(key("checksum"), stored) || !stored.isInt()) {
    throw CheckpointError(fmt::format("{} lacks its checksum: it is damaged", origin));
  }
  Checksum sum;
  add_meta(sum, loaded.meta);
  add_module(sum, loaded.module.parameters, loaded.module.buffers);
  add_optimizers(sum, loaded.optimizers);
  add_random(sum, loaded.random);
  add_values(sum, loaded.values.items());
  add_objects(sum, loaded.objects);
  loaded.checksum = sum.value();
  const auto expected = static_cast<std::uint64_t>(stored.toInt());
  if (loaded.checksum != expected) {
    throw CheckpointError(fmt::format("{} is damaged: its contents do not match its checksum (stored {:016x}, computed "
                                      "{:016x}); nothing was loaded. Resume from an earlier checkpoint",
                                      origin, expected, loaded.checksum));
  }
  ResumeInfo& info = loaded.info;
  info.path = path;
  info.step = meta_value(loaded, "step", path);
  info.saved_processes = static_cast<int>(meta_value(loaded, "processes", path));
  info.saved_replicas = static_cast<std::size_t>(meta_value(loaded, "replicas", path));
  info.processes = core.options().processes;
  info.replicas = core.size();
  info.batch = meta_value(loaded, "batch", path);
  info.has_data_position = meta_value(loaded, "has_data_position", path) != 0;
  if (info.has_data_position) {
    info.epoch = static_cast<std::size_t>(meta_value(loaded, "epoch", path));
    info.epoch_samples = meta_value(loaded, "epoch_samples", path);
  }
  for (const std::string& name : core.optimizer_names()) {
    if (loaded.optimizers.count(name) != 0) continue;
    info.notes.push_back(name.empty() ? std::string("the checkpoint has no optimizer state: the optimizer starts afresh")
                                      : fmt::format("the checkpoint has no state of {}: it starts afresh",
                                                    optimizer_text(name)));
  }
  // A generator's state of another size (another LibTorch) would fail in
  // set_state, after the rest was applied: checked now.
  const auto current = local_random_states(core.devices());
  const int rank = core.options().process_rank;
  for (std::size_t i = 0; i < current.size(); ++i) {
    const auto saved = loaded.random.find(i == 0 ? fmt::format("rank{}_cpu", rank)
                                                 : fmt::format("rank{}_replica{}", rank, i - 1));
    if (saved != loaded.random.end() && current[i].defined() && saved->second.numel() != current[i].numel()) {
      throw CheckpointError(fmt::format("{}: its random state {} has {} bytes, this LibTorch's {}: was it written by "
                                        "another LibTorch version?",
                                        origin, saved->first, saved->second.numel(), current[i].numel()));
    }
  }
  // The data the place refers to must be the same data, in the same order.
  const auto& sampler = core.progress().sampler();
  if (sampler && info.has_data_position) {
    const auto size = static_cast<std::size_t>(meta_value(loaded, "data_size", path));
    const auto seed = static_cast<std::uint64_t>(meta_value(loaded, "data_seed", path));
    const bool shuffle = meta_value(loaded, "data_shuffle", path) != 0;
    if (size != sampler->size() || seed != sampler->seed() || shuffle != sampler->shuffle()) {
      throw CheckpointError(fmt::format("{} was saved for a data set of {} samples, {}, seed {}; the attached sampler "
                                        "has {} samples, {}, seed {}: its place in the data would mean other samples",
                                        origin, size, shuffle ? "shuffled" : "in order", seed, sampler->size(),
                                        sampler->shuffle() ? "shuffled" : "in order", sampler->seed()));
    }
  }
  return loaded;
}

/// Sets this process's generators from the gathered states; says what it could not.
inline void restore_random_states(DataParallelCore& core, const std::map<std::string, at::Tensor>& random,
                                  ResumeInfo& info) {
  const int rank = core.options().process_rank;
  const auto cpu_state = random.find(fmt::format("rank{}_cpu", rank));
  if (cpu_state == random.end()) {
    info.notes.push_back(fmt::format("random states: the checkpoint has none of rank {} (saved on {} processes); this "
                                     "process keeps its own",
                                     rank, info.saved_processes));
    return;
  }
  {
    auto cpu = at::detail::getDefaultCPUGenerator();
    const std::lock_guard<std::mutex> lock(cpu.mutex());
    cpu.set_state(cpu_state->second);
  }
  std::size_t missing = 0;
  for (std::size_t r = 0; r < core.size(); ++r) {
    if (!core.device(r).is_cuda()) continue;
    const auto state = random.find(fmt::format("rank{}_replica{}", rank, r));
    if (state == random.end()) {
      ++missing;
      continue;
    }
    auto generator = at::globalContext().defaultGenerator(core.device(r));
    const std::lock_guard<std::mutex> lock(generator.mutex());
    generator.set_state(state->second);
  }
  if (missing > 0) {
    info.notes.push_back(fmt::format("random states: {} GPU replica(s) of rank {} had none saved and keep their own",
                                     missing, rank));
  }
}

/// The attached objects' states, serialised by name.
using Objects = std::map<std::string, CheckpointExtras::Object>;

/// The objects a checkpoint keeps: the attached ones, and the DataParallel's
/// own GradScaler as "grad_scaler" (unless something else is attached so).
inline Objects objects_of(DataParallelCore& core, const CheckpointExtras& extras) {
  Objects objects = extras.objects;
  if (GradScaler* scaler = core.grad_scaler(); scaler != nullptr && objects.count("grad_scaler") == 0) {
    objects["grad_scaler"] = {[scaler](torch::serialize::OutputArchive& archive) { scaler->save(archive); },
                              [scaler](torch::serialize::InputArchive& archive) { scaler->load(archive); }};
  }
  return objects;
}

inline std::map<std::string, std::string> save_objects(const Objects& objects) {
  std::map<std::string, std::string> out;
  for (const auto& [name, object] : objects) {
    torch::serialize::OutputArchive part;
    object.save(part);
    std::ostringstream bytes;
    part.save_to(bytes);
    out[name] = bytes.str();
  }
  return out;
}

/// Loads the attached objects' states; says which had none saved.
inline void restore_objects(const Objects& objects, const std::map<std::string, std::string>& saved,
                            const std::string& path, ResumeInfo& info) {
  for (const auto& [name, object] : objects) {
    const auto found = saved.find(name);
    if (found == saved.end()) {
      info.notes.push_back(fmt::format("\"{}\" is not in the checkpoint: it keeps its state", name));
      continue;
    }
    std::istringstream bytes(found->second);
    torch::serialize::InputArchive archive;
    try {
      archive.load_from(bytes);
      object.load(archive);
    } catch (const std::exception& e) {
      throw CheckpointError(fmt::format("load_state: the state of \"{}\" in {} does not load into the attached "
                                        "object: {}; nothing was changed",
                                        name, path, e.what()));
    }
  }
  for (const auto& item : saved) {
    if (objects.count(item.first) == 0) {
      info.notes.push_back(fmt::format("the checkpoint holds the state of \"{}\", and nothing is attached under "
                                       "that name (dp.attach(\"{}\", object) before load_state restores it)",
                                       item.first, item.first));
    }
  }
}

}  // namespace checkpoint

inline void save_module(DataParallelCore& core, const std::string& path) {
  core.check_communicator("save");
  const auto fence = core.fenced();
  const ReplicaStreamsCurrent on_replicas(core.contexts());  // read after the replicas' work
  torch::serialize::OutputArchive archive;
  core.replica(0).save(archive);
  checkpoint::write(archive, path);
}

inline void load_module(DataParallelCore& core, const std::string& path) {
  const auto fence = core.fenced();
  const ReplicaStreamsCurrent on_replicas(core.contexts());
  std::string failure;
  ModuleTensors module;
  Checksum sum;
  try {
    torch::serialize::InputArchive archive = checkpoint::open(path, "load");
    module = checkpoint::read_module(core, archive, "load: the checkpoint " + path);
    checkpoint::add_module(sum, module.parameters, module.buffers);
  } catch (const std::exception& e) {
    failure = e.what();
  }
  checkpoint::agree(core, "load: the checkpoint", path, failure, sum.value());
  core.assign_module_state(module.parameters, module.buffers);
  if (!core.has_optimizer()) core.mark_consistent();
}

inline void save_optimizer(DataParallelCore& core, const std::string& path) {
  const std::string state = core.optimizer_state();
  checkpoint::write_atomically(path, [&state](FileSink& sink) { sink.write(state.data(), state.size()); });
}

inline void load_optimizer(DataParallelCore& core, const std::string& path) {
  core.optimizer(0);  // throws when there is none
  std::ifstream in(path, std::ios::binary);
  if (!in) throw CheckpointError(fmt::format("load_optimizer: cannot open {}: {}", path, std::strerror(errno)));
  const std::string state((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  core.load_optimizer_state(state, path);
}

inline void attach_sampler(DataParallelCore& core, const DistributedSampler& sampler) {
  const auto& options = core.options();
  if (sampler.processes() != options.processes || sampler.rank() != options.process_rank) {
    throw CheckpointError(fmt::format("attach: the sampler is rank {}'s part for {} processes, and this DataParallel "
                                      "trains as rank {} of {}: make it DistributedSampler(size, group->size(), "
                                      "group->rank())",
                                      sampler.rank(), sampler.processes(), options.process_rank, options.processes));
  }
  core.progress().attach(sampler);
}

inline void save_training_state(DataParallelCore& core, const std::string& path, const CheckpointExtras& extras) {
  core.check_communicator("save_state");
  const CollectivePurpose purpose("save_state");
  std::string failure;
  try {
    core.require_usable("save_state");
    if (core.progress().pending() > 0) {
      throw CheckpointError("save_state after forward_backward and before step(): the accumulated gradients are not "
                            "part of a checkpoint; save after the step");
    }
  } catch (const std::exception& e) {
    failure = e.what();
  }
  checkpoint::fail_together(core, failure, "save_state: another rank cannot save now (its output says why)");
  const auto fence = core.fenced();
  const ReplicaStreamsCurrent on_replicas(core.contexts());  // read after the replicas' work
  const auto random = checkpoint::gather_random_states(core);  // collective
  const auto& options = core.options();
  if (options.process_rank == 0) {
    try {
      const TrainingProgress& progress = core.progress();
      std::map<std::string, std::int64_t> meta{
          {"step", core.steps()},
          {"processes", options.processes},
          {"replicas", static_cast<std::int64_t>(core.size())},
          {"batch", progress.largest_step() * options.processes},
          {"has_data_position", progress.sampler() ? 1 : 0}};
      if (const auto& sampler = progress.sampler()) {
        std::size_t epoch = progress.epoch();
        std::int64_t seen = progress.epoch_samples();
        if (seen >= static_cast<std::int64_t>(sampler->local_size())) {  // the epoch is done: the next one's start
          ++epoch;
          seen = 0;
        }
        meta["epoch"] = static_cast<std::int64_t>(epoch);
        meta["epoch_samples"] = seen * options.processes;
        meta["data_size"] = static_cast<std::int64_t>(sampler->size());
        meta["data_seed"] = static_cast<std::int64_t>(sampler->seed());
        meta["data_shuffle"] = sampler->shuffle() ? 1 : 0;
      }
      torch::serialize::OutputArchive archive;
      core.replica(0).save(archive);  // the module at the top: torch::load(net, path) reads it
      archive.write(checkpoint::key("format"), c10::IValue(kCheckpointFormat));
      torch::serialize::OutputArchive meta_part;
      for (const auto& [name, value] : meta) meta_part.write(name, c10::IValue(value));
      archive.write(checkpoint::key("meta"), meta_part);
      std::map<std::string, std::string> optimizers;
      for (const std::string& name : core.optimizer_names()) optimizers[name] = core.optimizer_state(name);
      torch::serialize::OutputArchive named_part;
      for (const auto& [name, state] : optimizers) {
        if (name.empty()) {
          archive.write(checkpoint::key("optimizer"), checkpoint::bytes_tensor(state), /*is_buffer=*/true);
        } else {
          named_part.write(name, checkpoint::bytes_tensor(state), /*is_buffer=*/true);
        }
      }
      if (optimizers.size() > optimizers.count("")) archive.write(checkpoint::key("optimizers"), named_part);
      torch::serialize::OutputArchive random_part;
      for (const auto& [name, state] : random) random_part.write(name, state, /*is_buffer=*/true);
      archive.write(checkpoint::key("random"), random_part);
      torch::serialize::OutputArchive values_part;
      for (const auto& [name, value] : extras.values.items()) {
        if (value.isTensor()) {
          values_part.write(name, value.toTensor(), /*is_buffer=*/true);
        } else {
          values_part.write(name, value);
        }
      }
      archive.write(checkpoint::key("values"), values_part);
      const std::map<std::string, std::string> objects = checkpoint::save_objects(checkpoint::objects_of(core, extras));
      torch::serialize::OutputArchive objects_part;
      for (const auto& [name, bytes] : objects) {
        objects_part.write(name, checkpoint::bytes_tensor(bytes), /*is_buffer=*/true);
      }
      archive.write(checkpoint::key("objects"), objects_part);
      Checksum sum;
      checkpoint::add_meta(sum, meta);
      std::vector<at::Tensor> buffers;
      for (const auto& buffer : core.buffers(0)) buffers.push_back(buffer);
      checkpoint::add_module(sum, core.parameters(0), buffers);
      checkpoint::add_optimizers(sum, optimizers);
      checkpoint::add_random(sum, random);
      checkpoint::add_values(sum, extras.values.items());
      checkpoint::add_objects(sum, objects);
      archive.write(checkpoint::key("checksum"), c10::IValue(static_cast<std::int64_t>(sum.value())));
      checkpoint::write(archive, path);
    } catch (const std::exception& e) {
      failure = fmt::format("save_state: {}", e.what());
    }
  }
  checkpoint::fail_together(
      core, failure, fmt::format("save_state: rank 0 could not write the checkpoint {} (its output says why)", path));
}

inline ResumeInfo load_training_state(DataParallelCore& core, const std::string& path, CheckpointExtras& extras) {
  core.check_communicator("load_state");
  const CollectivePurpose purpose("load_state");
  const auto fence = core.fenced();
  const ReplicaStreamsCurrent on_replicas(core.contexts());
  std::string failure;
  checkpoint::Loaded loaded;
  try {
    loaded = checkpoint::read_training_state(core, path);
  } catch (const std::exception& e) {
    failure = e.what();
  }
  checkpoint::agree(core, "load_state: the checkpoint", path, failure, loaded.checksum);  // collective

  // Everything was read and checked. The optimizer and the attached objects
  // can still refuse their state (another optimizer, a user object's own
  // check): they go first, with their previous states kept to put back;
  // what follows cannot fail.
  const std::string origin = "the checkpoint " + path;
  std::map<std::string, std::string> previous_optimizers;  // of those loaded so far
  const auto put_back_optimizers = [&] {
    for (const auto& [name, state] : previous_optimizers) core.load_optimizer_state(state, "the previous state", name);
  };
  const checkpoint::Objects objects = checkpoint::objects_of(core, extras);
  const auto previous_objects = checkpoint::save_objects(objects);
  try {
    for (const auto& [name, state] : loaded.optimizers) {
      const std::string previous = core.optimizer_state(name);
      core.load_optimizer_state(state, origin, name);
      previous_optimizers[name] = previous;
    }
  } catch (...) {
    put_back_optimizers();
    throw;
  }
  try {
    checkpoint::restore_objects(objects, loaded.objects, path, loaded.info);
  } catch (...) {
    checkpoint::restore_objects(objects, previous_objects, path, loaded.info);
    put_back_optimizers();
    throw;
  }
  core.assign_module_state(loaded.module.parameters, loaded.module.buffers);
  if (loaded.optimizers.size() == core.optimizer_names().size()) core.mark_consistent();
  ResumeInfo info = std::move(loaded.info);
  core.set_steps(info.step);
  const std::int64_t processes = info.processes;
  const std::int64_t local = info.epoch_samples / processes;
  if (info.has_data_position) {
    if (info.epoch_samples % processes != 0) {
      info.notes.push_back(fmt::format("the {} samples already seen of epoch {} do not split evenly over {} "
                                       "processes: each resumes after {}, so {} are seen again",
                                       info.epoch_samples, info.epoch, processes, local,
                                       info.epoch_samples - local * processes));
    }
    if (const auto& sampler = core.progress().sampler()) {
      DistributedSampler handle = *sampler;
      handle.resume_at(info.epoch, static_cast<std::size_t>(local));
    } else {
      info.notes.push_back(fmt::format("no sampler is attached: attach it (dp.attach) before load_state to resume "
                                       "at epoch {} after {} samples",
                                       info.epoch, info.epoch_samples));
    }
  }
  core.progress().restore(info.epoch, local, (info.batch + processes - 1) / processes);
  checkpoint::restore_random_states(core, loaded.random, info);
  extras.values = std::move(loaded.values);
  return info;
}

}  // namespace detail
}  // namespace multigpu
