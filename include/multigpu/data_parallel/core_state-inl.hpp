#pragma once
// The replicas' state: broadcasts, parity, and what checkpoints read and write: the definitions of these DataParallelCore members
// (declared in data_parallel/core.hpp, which includes this file).

#include "multigpu/data_parallel/core.hpp"

namespace multigpu {
namespace detail {

inline std::vector<at::Tensor> DataParallelCore::same_tensor_on_every_replica(std::size_t index, bool buffer) const {
  std::vector<at::Tensor> tensors;
  for (std::size_t r = 0; r < size(); ++r) tensors.push_back(buffer ? buffers_[r][index] : parameters_[r][index]);
  return tensors;
}

// Note [Checking the model across processes]
// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
// Rank 0's parameters are broadcast to every process at construction, one
// collective per parameter, and gradients are bucketed by the parameters'
// sizes: a process whose model has another parameter (another shape, dtype
// or count) pairs its broadcasts with the wrong ones, and fails or hangs
// far from the cause; one whose gradient buckets differ (another
// bucket_cap_mib, comm hook, ...) sends Gloo a message of another size,
// which Gloo's I/O thread answers with std::terminate: no error can name
// it afterwards. So, as PyTorch's verify_params_across_processes, every
// process first describes its model (each parameter's and buffer's name,
// dtype, shape and whether it trains) and the options that decide which
// collectives a step issues and their sizes, and the processes compare:
// one exchange of a short fingerprint through the store, and only when the
// fingerprints differ the whole descriptions, from which every process
// throws the same error naming the first difference against rank 0's.
inline void DataParallelCore::check_same_model_across_processes() {
  std::vector<std::string> lines;
  for (std::size_t i = 0; i < parameter_names_.size(); ++i) {
    const at::Tensor& p = parameters_[0][i];
    lines.push_back(fmt::format("parameter {} {}{}{}", parameter_names_[i], c10::toString(p.scalar_type()),
                                detail::shape_text(p.sizes()), p.requires_grad() ? "" : " (frozen)"));
  }
  for (std::size_t i = 0; i < buffer_names_.size(); ++i) {
    const at::Tensor& b = buffers_[0][i];
    lines.push_back(b.defined() ? fmt::format("buffer {} {}{}", buffer_names_[i], c10::toString(b.scalar_type()),
                                              detail::shape_text(b.sizes()))
                                : fmt::format("buffer {} (undefined)", buffer_names_[i]));
  }
  // The options that decide which collectives a step issues, and their sizes.
  lines.push_back(fmt::format("setting DataParallelOptions::bucket_cap_mib {}", options_.bucket_cap_mib));
  lines.push_back(fmt::format("setting DataParallelOptions::comm_hook {}",
                              options_.comm_hook ? options_.comm_hook->name() : "none"));
  lines.push_back(fmt::format("setting DataParallelOptions::find_unused_parameters {}", options_.find_unused_parameters));
  lines.push_back(fmt::format("setting DataParallelOptions::broadcast_buffers {}", options_.broadcast_buffers));
  lines.push_back(fmt::format("setting DataParallelOptions::grad_scaler {}", options_.grad_scaler ? "set" : "none"));
  std::string description;
  for (const auto& line : lines) description += line + "\n";
  const CollectivePurpose purpose("model check");
  const std::string fingerprint = fmt::format("{} {:x}", lines.size(), std::hash<std::string>{}(description));
  const auto fingerprints = options_.exchange_text(fingerprint);
  if (std::all_of(fingerprints.begin(), fingerprints.end(), [&](const std::string& f) { return f == fingerprints[0]; })) {
    return;
  }
  const auto descriptions = options_.exchange_text(description);
  // A description's lines of one kind: its parameters and buffers, or its settings.
  const auto lines_of = [](const std::string& text, bool settings) {
    std::vector<std::string> out;
    std::size_t begin = 0;
    for (std::size_t end; (end = text.find('\n', begin)) != std::string::npos; begin = end + 1) {
      std::string line = text.substr(begin, end - begin);
      if ((line.rfind("setting ", 0) == 0) == settings) out.push_back(std::move(line));
    }
    return out;
  };
  for (std::size_t rank = 1; rank < descriptions.size(); ++rank) {
    std::string difference;
    for (const bool settings : {false, true}) {
      const auto reference = lines_of(descriptions[0], settings);
      const auto other = lines_of(descriptions[rank], settings);
      const std::size_t common = std::min(reference.size(), other.size());
      std::size_t k = 0;
      while (k < common && reference[k] == other[k]) ++k;
      if (k == common && reference.size() == other.size()) continue;
      if (k < common) {
        difference = fmt::format("rank {}'s {}, rank 0's {}", rank, other[k], reference[k]);
      } else if (other.size() > reference.size()) {
        difference = fmt::format("rank {}'s {} is not in rank 0's model", rank, other[k]);
      } else {
        difference = fmt::format("rank 0's {} is not in rank {}'s model", reference[k], rank);
      }
      if (reference.size() != other.size()) {
        difference += fmt::format(" (rank {} has {} parameters and buffers, rank 0 {})", rank, other.size(),
                                  reference.size());
      }
      break;
    }
    if (difference.empty()) continue;
    throw DistributedError(fmt::format(
        "DataParallel: the processes built different models or options (found at construction, before any step): "
        "{}; every process must build the same model (parameters and buffers in the same order, with the same "
        "shapes and dtypes) with the same DataParallelOptions",
        difference));
  }
}

inline void DataParallelCore::broadcast_from_primary() {
  if (comm_->world_size() == 1) return;
  const auto fence = fenced();
  const compat::NoGradGuard no_grad;
  const ReplicaStreamsCurrent on_replicas(contexts_);
  for (std::size_t i = 0; i < parameter_names_.size(); ++i) {
    const CollectivePurpose purpose("parameter", -1, parameter_names_[i].c_str());
    comm_->broadcast(same_tensor_on_every_replica(i, false), 0);
  }
  broadcast_buffers();
}

// Note [Coalesced buffer broadcast]
// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
// Buffers (BatchNorm's running statistics and counters) go from the
// primary to every replica after each step. One collective per buffer
// would cost a launch (and, across processes, a round trip) per BatchNorm
// tensor: a ResNet-50 has 160. Instead the buffers of one dtype are packed
// into one flat tensor on the sender (one cat), broadcast once, and
// unpacked on the receivers with one foreach copy per replica (Note
// [Foreach ops across versions]): one collective per dtype (two for
// BatchNorm: float statistics, int64 counters), and per replica a few
// launches, not one per buffer. A receiver's flat tensor is only allocated
// (its old values would be overwritten), and the sender never copies into
// its own buffers: in one process replica 0 is the root and keeps its
// buffers untouched (their version counters too, which autograd checks
// when a buffer saved by a forward is used in backward). Across processes
// replica 0 receives on every rank but rank 0, and which one this process
// is the communicator does not say: there replica 0 packs and unpacks as
// before. Keeping the buffers as views of one flat tensor per dtype (as
// the gradient buckets are) would save the pack too, but a module owns
// its buffers and may replace them (load_state_dict, a user's own
// assignment), which would silently detach them from the flat tensor.
// Parameters, broadcast only at construction and by resync_from_primary(),
// go one by one, so that a large model never needs a second copy of itself.
inline void DataParallelCore::broadcast_buffers() {
  if (comm_->world_size() == 1) return;
  const auto fence = fenced();
  const compat::NoGradGuard no_grad;
  // Packed, broadcast and unpacked on the replicas' streams, between the
  // kernels that use the buffers: no wait for the host (Note [Streams], rule 3).
  const ReplicaStreamsCurrent on_replicas(contexts_);
  const bool primary_is_root = !spans_processes();
  std::map<at::ScalarType, std::vector<std::size_t>> by_type;  // dtype -> buffer indices, in module order
  for (std::size_t i = 0; i < buffer_names_.size(); ++i) {
    if (buffers_[0][i].defined()) by_type[buffers_[0][i].scalar_type()].push_back(i);
  }
  for (const auto& group : by_type) {
    std::int64_t numel = 0;
    for (std::size_t i : group.second) numel += buffers_[0][i].numel();
    std::vector<at::Tensor> flat(size());
    {
      std::vector<at::Tensor> parts;
      for (std::size_t i : group.second) parts.push_back(buffers_[0][i].reshape({-1}));
      flat[0] = parts.size() == 1 ? parts[0].clone() : at::cat(parts);
    }
    for (std::size_t r = 1; r < size(); ++r) flat[r] = at::empty({numel}, flat[0].options().device(devices_[r]));
    const CollectivePurpose purpose("buffers");
    comm_->broadcast(flat, 0);
    for (std::size_t r = primary_is_root ? 1 : 0; r < size(); ++r) {
      std::vector<at::Tensor> targets;
      std::vector<at::Tensor> sources;
      std::int64_t offset = 0;
      for (std::size_t i : group.second) {
        const at::Tensor& buffer = buffers_[r][i];
        targets.push_back(buffer);
        sources.push_back(flat[r].narrow(0, offset, buffer.numel()).view(buffer.sizes()));
        offset += buffer.numel();
      }
      compat::foreach_copy_(targets, sources);
    }
  }
}

inline void DataParallelCore::resync_from_primary() {
  const auto fence = fenced();
  broadcast_from_primary();
  for (auto& optimizer : optimizers_) {
    if (size() == 1) break;
    const std::string state = optimizer_state(optimizer.name);
    const ReplicaStreamsCurrent on_replicas(contexts_);
    for (std::size_t r = 1; r < size(); ++r) load_optimizer_into(*optimizer.replicas[r], r, state);
  }
  diverged_.clear();
}

inline void DataParallelCore::check_parity() {
  const auto fence = fenced();
  const compat::NoGradGuard no_grad;
  const ReplicaStreamsCurrent on_replicas(contexts_);  // compared after the replicas' work
  auto compare = [&](const std::vector<std::string>& names, const std::vector<std::vector<at::Tensor>>& tensors,
                     const char* kind) {
    for (std::size_t r = 1; r < size(); ++r) {
      for (std::size_t i = 0; i < names.size(); ++i) {
        const at::Tensor& primary = tensors[0][i];
        if (!primary.defined()) continue;
        const at::Tensor other = tensors[r][i].to(primary.device());
        if (at::equal(primary, other)) continue;
        std::string difference;
        if (primary.is_floating_point()) {
          difference = fmt::format(" (largest difference {:.3g})", (primary - other).abs().max().item<double>());
        }
        throw ReplicaError(fmt::format("replica {} ({}) has drifted from the primary after {} optimizer steps: {} {} "
                                       "differs{}",
                                       r, devices_[r].str(), steps_, kind, names[i], difference),
                           static_cast<int>(r), devices_[r].str());
      }
    }
  };
  compare(parameter_names_, parameters_, "parameter");
  compare(buffer_names_, buffers_, "buffer");
}

inline void DataParallelCore::train(bool on) {
  for (auto& replica : replicas_) replica->train(on);
}

inline void DataParallelCore::assign_module_state(const std::vector<at::Tensor>& parameters,
                                                  const std::vector<at::Tensor>& buffers) {
  if (parameters.size() != parameter_names_.size() || buffers.size() != buffer_names_.size()) {
    throw Error(fmt::format("DataParallel: {} parameters and {} buffers given for a module of {} and {}",
                            parameters.size(), buffers.size(), parameter_names_.size(), buffer_names_.size()));
  }
  const auto fence = fenced();
  const compat::NoGradGuard no_grad;
  const ReplicaStreamsCurrent on_replicas(contexts_);
  for (std::size_t r = 0; r < size(); ++r) {
    for (std::size_t i = 0; i < parameters.size(); ++i) parameters_[r][i].copy_(parameters[i]);
    for (std::size_t i = 0; i < buffers.size(); ++i) {
      if (buffers_[r][i].defined()) buffers_[r][i].copy_(buffers[i]);
    }
  }
}

inline std::string DataParallelCore::optimizer_state(const std::string& name) {
  auto& primary = optimizer(0, name);
  const auto fence = fenced();
  const ReplicaStreamsCurrent on_replicas(contexts_);  // read after the replicas' work
  std::ostringstream state;
  torch::serialize::OutputArchive archive;
  primary.save(archive);
  archive.save_to(state);
  return state.str();
}

// All or none: the primary's state is kept first, so that a state which
// fails half-way (another optimizer, another number of parameters) can be
// put back; once it fits the primary, it fits every replica (same module).
inline void DataParallelCore::load_optimizer_state(const std::string& state, const std::string& origin,
                                                   const std::string& name) {
  auto& optimizer = find_optimizers(name, "load_optimizer");
  const std::string previous = optimizer_state(name);
  const auto fence = fenced();
  const ReplicaStreamsCurrent on_replicas(contexts_);
  try {
    load_optimizer_into(*optimizer.replicas[0], 0, state);
  } catch (const c10::Error& e) {
    try {
      load_optimizer_into(*optimizer.replicas[0], 0, previous);
    } catch (const c10::Error&) {
      diverged_ = "loading an optimizer state failed half-way and the primary's could not be put back";
    }
    throw CheckpointError(fmt::format("cannot load the optimizer{} state of {}: {}; the optimizers are unchanged",
                                      name.empty() ? "" : fmt::format(" \"{}\"", name), origin,
                                      e.what_without_backtrace()));
  }
  for (std::size_t r = 1; r < size(); ++r) load_optimizer_into(*optimizer.replicas[r], r, state);
}

// LibTorch's Optimizer::load adds the saved entries to the state it has and
// keeps the others: cleared first, the state is the saved one and nothing else.
inline void DataParallelCore::load_optimizer_into(torch::optim::Optimizer& optimizer, std::size_t r,
                                                  const std::string& state) {
  std::istringstream input(state);
  torch::serialize::InputArchive archive;
  archive.load_from(input, devices_[r]);
  optimizer.state().clear();
  optimizer.load(archive);
  compat::restore_param_group_options(optimizer, archive);  // See Note [Parameter group options on load]
}

inline std::optional<SyncStats> DataParallelCore::last_sync_stats() const {
  if (!reducer_) return std::nullopt;
  return reducer_->last_stats();
}

}  // namespace detail
}  // namespace multigpu
