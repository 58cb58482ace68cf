#pragma once
/// @file
/// Checkpoints of a whole training, to stop it anywhere and resume it,
/// also on another number of devices or processes.
///
///   multigpu::DistributedSampler sampler(dataset_size, group->size(), group->rank());
///   auto loader = torch::data::make_data_loader(dataset, sampler, options);  // shares the sampler's state
///   dp.attach(sampler);                       // checkpoints record the place in the data
///   if (resuming) fmt::print("{}\n", dp.load_state("run/last.pt").describe());
///   for (std::size_t epoch = sampler.epoch(); epoch < epochs; ++epoch) {
///     for (auto& batch : *loader) {           // a resumed epoch skips what was trained on
///       dp.train_step(batch, loss_fn);
///       if (dp.steps() % 500 == 0) dp.save_state("run/last.pt");
///     }
///   }
///
/// See Note [Checkpoints] for what a checkpoint holds and guarantees.

#include <cstdint>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <functional>
#include <map>
#include <string>
#include <type_traits>
#include <vector>

#include <fcntl.h>
#include <unistd.h>

#include <ATen/core/ivalue.h>
#include <torch/nn/module.h>
#include <torch/serialize/input-archive.h>
#include <torch/serialize/output-archive.h>
#include <fmt/core.h>

#include "multigpu/detail/atomic_file.hpp"
#include "multigpu/detail/module_state.hpp"
#include "multigpu/error.hpp"

namespace multigpu {

// Note [Checkpoints]
// ~~~~~~~~~~~~~~~~~~
// dp.save_state(path) writes one file with everything a training needs to
// go on as if it had never stopped:
// - the module's parameters and buffers, in torch::save's layout at the top
//   of the file, so that torch::load(net, path) (and dp.load) still read
//   the model alone;
// - the primary optimizer's state (every replica's is the same);
// - the number of optimizer steps, and the largest step's batch over every
//   process;
// - with a sampler attached (dp.attach), its epoch and how many of the
//   epoch's samples went into completed steps: counted by DataParallel as
//   it trains, not taken from the sampler, which a loader with workers has
//   moved ahead;
// - LibTorch's random states: each process's CPU generator and the
//   generator of each of its replicas' GPUs;
// - the user's own values (dp.values(): numbers and tensors by name), and
//   the state of attached objects (dp.attach(name, object): a GradScaler,
//   your own: anything with save(OutputArchive&) and load(InputArchive&));
// - a checksum over all of it.
//
// Independent of the layout. Nothing depends on how many replicas and
// processes wrote it: the data position is kept as samples over every
// process (each process has seen the same number, DistributedSampler gives
// them equal parts), which on P processes is the first samples x P of the
// epoch's one shuffled order, and any other number of processes resumes at
// the same prefix. The batch is kept over every process, so that
// ResumeInfo can say how to keep the effective batch. The random states
// are restored where the same rank and replica exist.
//
// Nothing changes unless everything fits. load_state reads the whole file,
// checks every tensor of the module against yours (a missing or extra
// tensor, another shape or dtype is an error naming it), the sampler's data
// set and seed, and the checksum, before it changes anything. The
// optimizer's state goes into the primary first, with the old state put
// back if it does not fit; only then into the others. The replicas are
// identical afterwards. dp.load reads the module part the same way.
//
// Atomic. The file is written beside its place under a temporary name,
// flushed, and renamed over it (detail/atomic_file.hpp): a process killed
// while saving leaves the last good checkpoint in place, and a full disk
// is a CheckpointError (see Note [A full disk fails a save, not the
// program]).
//
// Several processes. save_state and load_state are collective: every rank
// calls them. Rank 0 alone writes (after gathering every rank's random
// states), and every rank learns whether it succeeded. Every rank reads the
// file itself (a shared file system, or a copy on each machine); rank 0's
// checksum is compared with every rank's before anyone changes anything,
// so all resume from one checkpoint or all fail, naming the ranks that
// differ.
//
// Errors of their own. What a checkpoint refuses (a file that is not a
// checkpoint of this model, a damaged one, a path it cannot be written to, a
// value or name it cannot hold) throws CheckpointError, on every rank, so that
// a caller can tell it from a failing step (ReplicaError, CommError). A
// communicator broken before the call stays a CommError.

/// Throws unless `name` is a valid name in a checkpoint: letters, digits, underscores.
inline void check_checkpoint_name(const std::string& name, const char* who) {
  bool valid = !name.empty();
  for (const char c : name) {
    valid = valid && ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_');
  }
  if (!valid) {
    throw CheckpointError(
        fmt::format("{}: \"{}\" is not a valid name: use letters, digits and underscores", who, name));
  }
}

/// The user's own values saved with a checkpoint: numbers and tensors by
/// name (letters, digits and underscores).
class CheckpointValues {
 public:
  /// Sets a number (an integer stays an integer).
  template <class T, class = std::enable_if_t<std::is_arithmetic<T>::value>>
  void set(const std::string& name, T value) {
    check_name(name);
    if constexpr (std::is_integral<T>::value) {
      values_[name] = c10::IValue(static_cast<std::int64_t>(value));
    } else {
      values_[name] = c10::IValue(static_cast<double>(value));
    }
  }
  /// Sets a tensor (saved on the CPU; read back on the CPU).
  void set(const std::string& name, const at::Tensor& value) {
    check_name(name);
    if (!value.defined()) {
      throw CheckpointError(fmt::format("CheckpointValues::set(\"{}\"): the tensor is undefined", name));
    }
    values_[name] = c10::IValue(value.detach().to(at::kCPU).clone());
  }
  /// Whether a value of this name is set.
  bool contains(const std::string& name) const { return values_.count(name) != 0; }
  /// Removes the value of this name (nothing when there is none).
  void erase(const std::string& name) { values_.erase(name); }
  /// The names of the values set, in order.
  std::vector<std::string> names() const {
    std::vector<std::string> out;
    for (const auto& item : values_) out.push_back(item.first);
    return out;
  }
  /// The number `name` (an integer is converted).
  double number(const std::string& name) const {
    const c10::IValue& value = get(name);
    if (value.isDouble()) return value.toDouble();
    if (value.isInt()) return static_cast<double>(value.toInt());
    throw CheckpointError(fmt::format("CheckpointValues: \"{}\" is a tensor, not a number", name));
  }
  /// The integer `name`.
  std::int64_t integer(const std::string& name) const {
    const c10::IValue& value = get(name);
    if (value.isInt()) return value.toInt();
    throw CheckpointError(fmt::format("CheckpointValues: \"{}\" is a {}, not an integer", name,
                                      value.isDouble() ? "floating-point number" : "tensor"));
  }
  /// The tensor `name`.
  at::Tensor tensor(const std::string& name) const {
    const c10::IValue& value = get(name);
    if (value.isTensor()) return value.toTensor();
    throw CheckpointError(fmt::format("CheckpointValues: \"{}\" is a number, not a tensor", name));
  }
  /// Every value by name.
  const std::map<std::string, c10::IValue>& items() const { return values_; }
  /// Removes every value.
  void clear() { values_.clear(); }

 private:
  static void check_name(const std::string& name) { check_checkpoint_name(name, "CheckpointValues"); }
  const c10::IValue& get(const std::string& name) const {
    const auto found = values_.find(name);
    if (found != values_.end()) return found->second;
    std::string known;
    for (const auto& item : values_) known += (known.empty() ? "" : ", ") + item.first;
    throw CheckpointError(fmt::format("CheckpointValues: no value \"{}\"; there are: {}", name,
                                      known.empty() ? "none" : known));
  }

  std::map<std::string, c10::IValue> values_;
};

/// What DataParallel::load_state found and did.
struct ResumeInfo {
  /// The checkpoint file read.
  std::string path;
  /// Optimizer steps done when it was saved (dp.steps() now).
  std::int64_t step = 0;
  /// Whether it recorded a place in the data (a sampler was attached).
  bool has_data_position = false;
  /// The epoch to go on with, and how many of its samples (over every
  /// process) were already trained on: an attached sampler skips them.
  std::size_t epoch = 0;
  /// Samples of `epoch` (over every process) already trained on.
  std::int64_t epoch_samples = 0;
  /// Layout when saved and now: processes, and replicas per process.
  int saved_processes = 1;
  /// Replicas per process when saved.
  std::size_t saved_replicas = 1;
  /// Processes now.
  int processes = 1;
  /// Replicas per process now.
  std::size_t replicas = 1;
  /// Samples of the largest optimizer step over every process (0: unknown).
  std::int64_t batch = 0;
  /// Whether the optimizer state was sharded over the replicas when saved
  /// (DataParallelOptions::shard_optimizer_state; false for older checkpoints).
  bool saved_sharded = false;
  /// Whether the optimizer state is sharded now.
  bool sharded = false;
  /// What could not be restored exactly (said by describe()).
  std::vector<std::string> notes;

  /// Whether it is resumed on another number of processes or replicas than it was saved on.
  bool layout_changed() const { return saved_processes != processes || saved_replicas != replicas; }
  /// The batch each process should load to keep the effective batch
  /// (`batch` split over this layout; 0 when unknown).
  std::int64_t batch_per_process() const {
    return batch <= 0 ? 0 : (batch + processes - 1) / processes;
  }
  /// One line (two with a new layout, more with notes).
  std::string describe() const {
    std::string out = fmt::format("resumed from {} at step {}", path, step);
    if (has_data_position) {
      out += fmt::format(", {} samples into the sampler's epoch {} (counted from 0)", epoch_samples, epoch);
    }
    if (layout_changed()) {
      out += fmt::format("\nsaved on {} replicas x {} processes, resuming on {} x {}", saved_replicas,
                         saved_processes, replicas, processes);
      if (batch > 0) {
        const auto before = static_cast<std::int64_t>(saved_replicas) * saved_processes;
        const auto now = static_cast<std::int64_t>(replicas) * processes;
        out += fmt::format("; {} -> {} samples per replica", (batch + before - 1) / before, (batch + now - 1) / now);
      }
    }
    if (saved_sharded != sharded) {
      const auto layout = [](bool on) { return on ? "sharded over the replicas" : "whole on every replica"; };
      out += fmt::format("\noptimizer state saved {}, resuming {} (the same state either way)", layout(saved_sharded),
                         layout(sharded));
    }
    for (const auto& note : notes) out += "\n" + note;
    return out;
  }
};

namespace detail {

/// What a training checkpoint keeps beside the module and the optimizers:
/// the user's values, and the state of attached objects (a GradScaler, your
/// own), each saved through its save(OutputArchive&) / load(InputArchive&).
struct CheckpointExtras {
  struct Object {
    std::function<void(torch::serialize::OutputArchive&)> save;
    std::function<void(torch::serialize::InputArchive&)> load;
  };
  CheckpointValues values;
  std::map<std::string, Object> objects;
};

}  // namespace detail

/// Throws CheckpointError (naming `path` and why) unless a checkpoint can be written
/// there: its folder exists and takes a new file. Creates and removes a
/// probe file beside it. Call it before a long training, not after.
inline void check_checkpoint_path(const std::string& path) {
  namespace fs = std::filesystem;
  if (path.empty()) throw CheckpointError("the checkpoint path is empty");
  const fs::path target(path);
  if (!target.has_filename() || target.filename() == "." || target.filename() == "..") {
    throw CheckpointError(fmt::format("the checkpoint path {} names a folder; name a file in it", path));
  }
  std::error_code error;
  if (fs::is_directory(target, error)) {
    throw CheckpointError(fmt::format("the checkpoint path {} is a folder; name a file in it", path));
  }
  const fs::path folder = target.parent_path().empty() ? fs::path(".") : target.parent_path();
  if (!fs::exists(folder, error)) {
    throw CheckpointError(
        fmt::format("cannot write the checkpoint {}: the folder {} does not exist", path, folder.string()));
  }
  if (!fs::is_directory(folder, error)) {
    throw CheckpointError(fmt::format("cannot write the checkpoint {}: {} is not a folder", path, folder.string()));
  }
  // Made, never found: see Note [Temporary files are made, never found].
  for (int attempt = 0; attempt < detail::kTemporaryAttempts; ++attempt) {
    const std::string probe = detail::temporary_path_for(path);
    const int fd = ::open(probe.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0644);
    if (fd >= 0) {
      ::close(fd);
      std::remove(probe.c_str());
      return;
    }
    if (errno != EEXIST) break;
  }
  throw CheckpointError(fmt::format("cannot write the checkpoint {}: creating a file in {} failed: {}", path,
                                    folder.string(), std::strerror(errno)));
}

/// A fingerprint of `module`'s parameters and buffers (dtype, shape and
/// every bit): modules with the same one hold the same state. For checking
/// that a resumed training ends where an uninterrupted one does.
inline std::uint64_t state_checksum(const torch::nn::Module& module) {
  detail::Checksum sum;
  for (const auto& item : module.named_parameters()) {
    sum.add(item.key());
    sum.add(item.value());
  }
  for (const auto& item : module.named_buffers()) {
    sum.add(item.key());
    if (item.value().defined()) sum.add(item.value());
  }
  return sum.value();
}

}  // namespace multigpu
