#pragma once
// A module's state (parameters and buffers) between replicas, and between a
// module and a checkpoint: copied whole, read from torch::save's layout with
// every tensor checked before anything is changed, and checksummed.

#include <algorithm>
#include <cctype>
#include <cstdint>
#include <cstring>
#include <functional>
#include <map>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/Generator.h>
#include <fmt/core.h>
#include <torch/nn/module.h>
#include <torch/serialize/input-archive.h>

#include "multigpu/detail/compat.hpp"
#include "multigpu/detail/tensor_text.hpp"
#include "multigpu/error.hpp"

namespace multigpu {
namespace detail {

/// Keeps LibTorch's CPU random stream where it was: building replicas runs
/// module constructors and reset(), which draw random initial values that
/// are then overwritten. Without this, wrapping a model would change the
/// random numbers (dropout masks, shuffles) of the rest of the program.
class PreserveCpuRandomState {
 public:
  PreserveCpuRandomState() : state_(at::detail::getDefaultCPUGenerator().get_state()) {}
  ~PreserveCpuRandomState() {
    auto generator = at::detail::getDefaultCPUGenerator();
    generator.set_state(state_);
  }
  PreserveCpuRandomState(const PreserveCpuRandomState&) = delete;
  PreserveCpuRandomState& operator=(const PreserveCpuRandomState&) = delete;

 private:
  at::Tensor state_;
};

/// Copies `source`'s parameters and buffers into `target` (same structure).
void copy_module_state(const torch::nn::Module& source, torch::nn::Module& target, const char* origin);

/// Parameters and buffers in the order of a module's names, on the CPU.
struct ModuleTensors {
  std::vector<at::Tensor> parameters;
  std::vector<at::Tensor> buffers;
};

/// Reads from `archive` (torch::save's layout of a module: one nested
/// archive per submodule) the tensors named `parameter_names` and
/// `buffer_names`, each checked against `parameters_like` / `buffers_like`
/// (an undefined one is not expected), and checks that the archive holds
/// no other tensor or submodule. Throws CheckpointError naming `origin` and the first
/// mismatch: a missing or extra tensor, another shape or dtype. Keys that
/// start with `ignored_prefix` (a checkpoint's own) are not the module's.
ModuleTensors read_module_tensors(torch::serialize::InputArchive& archive, const std::string& origin,
                                  const std::vector<std::string>& parameter_names,
                                  const std::vector<at::Tensor>& parameters_like,
                                  const std::vector<std::string>& buffer_names,
                                  const std::vector<at::Tensor>& buffers_like, const std::string& ignored_prefix);

/// A 64-bit checksum of tensors and bytes, to tell a damaged checkpoint
/// from a good one (not a cryptographic hash). Eight bytes at a time.
class Checksum {
 public:
  void add(std::string_view bytes);
  void add(std::int64_t value) { add(std::string_view(reinterpret_cast<const char*>(&value), sizeof value)); }
  /// Its dtype, shape and data.
  void add(const at::Tensor& tensor);
  std::uint64_t value() const { return hash_; }

 private:
  void mix(std::uint64_t word) {
    hash_ ^= word;
    hash_ = (hash_ << 27 | hash_ >> 37) * 0x9E3779B97F4A7C15ULL;
  }
  std::uint64_t hash_ = 0x243F6A8885A308D3ULL;
};

// ---------------------------------------------------------------------------
// Definitions

inline void copy_module_state(const torch::nn::Module& source, torch::nn::Module& target, const char* origin) {
  const compat::NoGradGuard no_grad;
  auto copy = [&](const auto& from, const auto& to, const char* kind) {
    if (from.size() != to.size()) {
      throw Error(fmt::format("DataParallel: {} has {} {}s, your module has {}", origin, to.size(), kind,
                              from.size()));
    }
    for (const auto& item : from) {
      const at::Tensor* destination = to.find(item.key());
      if (destination == nullptr) {
        throw Error(fmt::format("DataParallel: {} has no {} named {}", origin, kind, item.key()));
      }
      if (destination->sizes() != item.value().sizes()) {
        throw Error(fmt::format("DataParallel: {} {} has shape {}, yours {}", kind, item.key(),
                                shape_text(destination->sizes()), shape_text(item.value().sizes())));
      }
      at::Tensor target_tensor = *destination;
      target_tensor.copy_(item.value());
    }
  };
  copy(source.named_parameters(), target.named_parameters(), "parameter");
  copy(source.named_buffers(), target.named_buffers(), "buffer");
}

inline void Checksum::add(std::string_view bytes) {
  mix(bytes.size());
  std::size_t i = 0;
  for (; i + 8 <= bytes.size(); i += 8) {
    std::uint64_t word = 0;
    std::memcpy(&word, bytes.data() + i, 8);
    mix(word);
  }
  std::uint64_t tail = 0;
  if (i < bytes.size()) std::memcpy(&tail, bytes.data() + i, bytes.size() - i);
  mix(tail);
}

inline void Checksum::add(const at::Tensor& tensor) {
  add(static_cast<std::int64_t>(tensor.scalar_type()));
  add(static_cast<std::int64_t>(tensor.dim()));
  for (const auto size : tensor.sizes()) add(static_cast<std::int64_t>(size));
  const at::Tensor data = tensor.detach().to(at::kCPU).contiguous();
  add(std::string_view(static_cast<const char*>(data.data_ptr()), data.numel() * data.element_size()));
}

namespace module_state {

/// The first tensor's full name under `archive` (found by `prefix`), or "".
inline std::string first_tensor(torch::serialize::InputArchive& archive, const std::string& prefix) {
  for (const std::string& key : archive.keys()) {
    at::Tensor tensor;
    if (archive.try_read(key, tensor)) return prefix + key;
    torch::serialize::InputArchive child;
    if (archive.try_read(key, child)) {
      std::string found = first_tensor(child, prefix + key + ".");
      if (!found.empty()) return found;
    }
  }
  return "";
}

/// "float [3, 16]": a tensor's dtype (as LibTorch names it, in lower case) and shape.
inline std::string describe(const at::Tensor& tensor) {
  std::string dtype = c10::toString(tensor.scalar_type());
  std::transform(dtype.begin(), dtype.end(), dtype.begin(), [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return fmt::format("{} {}", dtype, shape_text(tensor.sizes()));
}

}  // namespace module_state

inline ModuleTensors read_module_tensors(torch::serialize::InputArchive& archive, const std::string& origin,
                                         const std::vector<std::string>& parameter_names,
                                         const std::vector<at::Tensor>& parameters_like,
                                         const std::vector<std::string>& buffer_names,
                                         const std::vector<at::Tensor>& buffers_like,
                                         const std::string& ignored_prefix) {
  // Nested archives by module path ("" the top, "block.0" a submodule), and
  // the keys each must hold.
  std::map<std::string, torch::serialize::InputArchive> archives;
  std::map<std::string, std::vector<std::string>> expected_keys;
  auto split = [](const std::string& name) {
    const auto dot = name.rfind('.');
    return dot == std::string::npos ? std::make_pair(std::string(), name)
                                    : std::make_pair(name.substr(0, dot), name.substr(dot + 1));
  };
  // The archive of `path`, or nullptr when the checkpoint lacks it.
  std::function<torch::serialize::InputArchive*(const std::string&)> archive_of =
      [&](const std::string& path) -> torch::serialize::InputArchive* {
    if (path.empty()) return &archive;
    const auto found = archives.find(path);
    if (found != archives.end()) return &found->second;
    const auto [parent_path, key] = split(path);
    expected_keys[parent_path].push_back(key);
    torch::serialize::InputArchive* parent = archive_of(parent_path);
    torch::serialize::InputArchive child;
    if (parent == nullptr || !parent->try_read(key, child)) return nullptr;
    return &archives.emplace(path, std::move(child)).first->second;
  };
  auto read = [&](const std::vector<std::string>& names, const std::vector<at::Tensor>& like, const char* kind) {
    std::vector<at::Tensor> tensors(names.size());
    for (std::size_t i = 0; i < names.size(); ++i) {
      if (!like[i].defined()) continue;
      const auto [path, key] = split(names[i]);
      expected_keys[path].push_back(key);
      torch::serialize::InputArchive* holder = archive_of(path);
      if (holder == nullptr || !holder->try_read(key, tensors[i], std::string(kind) == "buffer")) {
        throw CheckpointError(fmt::format("{} has no {} {}, which your module has ({}); is it a checkpoint of this "
                                          "model?",
                                          origin, kind, names[i], module_state::describe(like[i])));
      }
      if (tensors[i].sizes() != like[i].sizes() || tensors[i].scalar_type() != like[i].scalar_type()) {
        throw CheckpointError(fmt::format("{}: {} {} is {} in the checkpoint and {} in your module; is it a checkpoint "
                                          "of this model?",
                                          origin, kind, names[i], module_state::describe(tensors[i]),
                                          module_state::describe(like[i])));
      }
    }
    return tensors;
  };
  ModuleTensors out;
  out.parameters = read(parameter_names, parameters_like, "parameter");
  out.buffers = read(buffer_names, buffers_like, "buffer");
  // Anything else in a visited archive is a tensor or submodule your module
  // lacks. ("training" is the archive's own flag, not a tensor.)
  std::vector<std::pair<std::string, torch::serialize::InputArchive*>> visited{{"", &archive}};
  for (auto& [path, held] : archives) visited.emplace_back(path, &held);
  for (auto& [path, held] : visited) {
    const auto& wanted = expected_keys[path];
    for (const std::string& key : held->keys()) {
      if (std::find(wanted.begin(), wanted.end(), key) != wanted.end() || key == "training") continue;
      if (path.empty() && !ignored_prefix.empty() && key.rfind(ignored_prefix, 0) == 0) continue;
      const std::string prefix = path.empty() ? "" : path + ".";
      at::Tensor tensor;
      torch::serialize::InputArchive child;
      std::string name;
      if (held->try_read(key, tensor)) {
        name = fmt::format("a tensor {} ({})", prefix + key, module_state::describe(tensor));
      } else if (held->try_read(key, child)) {
        const std::string first = module_state::first_tensor(child, prefix + key + ".");
        if (first.empty()) continue;  // an empty submodule holds nothing to load
        name = fmt::format("a submodule {} (with {})", prefix + key, first);
      } else {
        continue;  // a value of another kind (not the module's state)
      }
      throw CheckpointError(
          fmt::format("{} has {} that your module lacks; is it a checkpoint of this model?", origin, name));
    }
  }
  return out;
}

}  // namespace detail
}  // namespace multigpu
