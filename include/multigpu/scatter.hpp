#pragma once
/// @file
/// Splitting a batch along its first dimension (samples) into per-replica
/// shards, moving a shard to its replica's device, and gathering outputs.
///
/// multigpu knows these batch types:
///   - at::Tensor (dim 0 is samples);
///   - torch::data::Example<Data, Target> (data and target split alike;
///     what a data loader with the Stack transform yields);
///   - std::vector<T>: a list of samples, split into sub-lists (what a data
///     loader without Stack yields, e.g. std::vector<Example<>>);
///   - std::tuple<...> and std::pair<...>: fields, each split alike.
/// For your own batch type, specialise multigpu::BatchTraits:
///
///   template <> struct multigpu::BatchTraits<MyBatch> {
///     static std::int64_t size(const MyBatch& b) { return b.images.size(0); }
///     static MyBatch slice(const MyBatch& b, std::int64_t begin, std::int64_t end) { ... }
///     static MyBatch to(const MyBatch& b, const c10::Device& device) { ... }
///     // optional, for DataParallel::predict outputs:
///     static MyBatch gather(const std::vector<MyBatch>& parts, const c10::Device& device) { ... }
///     // optional, for predict outputs on GPUs (without it predict waits for the GPU):
///     static void for_each_tensor(const MyBatch& b, const std::function<void(const at::Tensor&)>& fn) { ... }
///   };

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <c10/core/Device.h>
#include <fmt/core.h>
#include <torch/data/example.h>

#include "multigpu/streams.hpp"
#include "multigpu/error.hpp"

namespace multigpu {

namespace detail {
template <class T>
struct always_false : std::false_type {};
}  // namespace detail

/// How to split a batch of type Batch (see the file comment). The primary
/// template is deliberately undefined in use: a batch type multigpu does not
/// know fails to compile with a message saying what to specialise.
template <class Batch, class Enable = void>
struct BatchTraits {
  static_assert(detail::always_false<Batch>::value,
                "multigpu does not know how to split this batch type into shards: specialise "
                "multigpu::BatchTraits<YourBatch> with size(), slice() and to() (see multigpu/scatter.hpp)");
};

/// Samples in a batch. A batch whose fields disagree on it is an error.
template <class Batch>
std::int64_t batch_size(const Batch& batch) {
  return BatchTraits<Batch>::size(batch);
}

/// Splits `batch` into consecutive shards of the given sizes (which must add
/// up to its size; zero sizes give empty shards). Shards share memory with
/// the batch where the type allows (tensor views).
template <class Batch>
std::vector<Batch> split_shards(const Batch& batch, const std::vector<std::int64_t>& sizes);

/// Copies (or, when already there, returns) a shard on `device`.
template <class Batch>
Batch shard_to(const Batch& shard, const c10::Device& device) {
  return BatchTraits<Batch>::to(shard, device);
}

/// Joins per-replica outputs, in replica order, on `device` (concatenating
/// along the first dimension).
template <class Output>
Output gather_outputs(const std::vector<Output>& parts, const c10::Device& device) {
  if (parts.empty()) throw Error("gather: no outputs to gather");
  return BatchTraits<Output>::gather(parts, device);
}

// --- specialisations ----------------------------------------------------------

/// A tensor batch: samples along dim 0.
template <>
struct BatchTraits<at::Tensor> {
  /// Samples: the first dimension.
  static std::int64_t size(const at::Tensor& t) {
    if (!t.defined()) throw Error("batch tensor is undefined");
    if (t.dim() == 0) {
      throw Error("batch tensor is a scalar (0 dimensions); its first dimension must count the samples");
    }
    return t.size(0);
  }
  /// Samples [begin, end), as a view.
  static at::Tensor slice(const at::Tensor& t, std::int64_t begin, std::int64_t end) {
    return t.narrow(0, begin, end - begin);
  }
  /// On `device`, copied without blocking (the same tensor when already there).
  static at::Tensor to(const at::Tensor& t, const c10::Device& device) {
    // non_blocking: a pinned source copies asynchronously on the replica's
    // stream, ordered before the forward pass that reads it. A shard already
    // there is a view of the caller's batch, read on the replica's stream:
    // see Note [Streams], rule 4.
    if (t.device() == device) {
      detail::mark_used_on_current_stream(t);
      return t;
    }
    return t.to(device, /*non_blocking=*/true);
  }
  /// The parts concatenated along dim 0 on `device`.
  static at::Tensor gather(const std::vector<at::Tensor>& parts, const c10::Device& device) {
    std::vector<at::Tensor> moved;
    moved.reserve(parts.size());
    for (const auto& part : parts) moved.push_back(part.device() == device ? part : part.to(device));
    return at::cat(moved, 0);
  }
};

namespace detail {

/// The common size of several fields (every field counts its samples).
inline std::int64_t agree_on_size(const std::vector<std::int64_t>& sizes, const char* what) {
  std::int64_t size = -1;
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    if (size >= 0 && sizes[i] != size) {
      std::string listed;
      for (std::size_t j = 0; j < sizes.size(); ++j) {
        listed += fmt::format("{}{}", j == 0 ? "" : ", ", sizes[j]);
      }
      throw Error(fmt::format("the fields of a {} batch disagree on the number of samples ({}); every field "
                              "must have the samples along its first dimension",
                              what, listed));
    }
    size = sizes[i];
  }
  return size;
}

}  // namespace detail

/// An example with a target: data and target split alike.
template <class Data, class Target>
struct BatchTraits<torch::data::Example<Data, Target>> {
  /// The example type.
  using Example = torch::data::Example<Data, Target>;
  /// Samples of the data (the target must agree).
  static std::int64_t size(const Example& e) {
    return detail::agree_on_size({BatchTraits<Data>::size(e.data), BatchTraits<Target>::size(e.target)},
                                 "torch::data::Example");
  }
  /// Samples [begin, end) of data and target.
  static Example slice(const Example& e, std::int64_t begin, std::int64_t end) {
    return Example(BatchTraits<Data>::slice(e.data, begin, end), BatchTraits<Target>::slice(e.target, begin, end));
  }
  /// Data and target on `device`.
  static Example to(const Example& e, const c10::Device& device) {
    return Example(BatchTraits<Data>::to(e.data, device), BatchTraits<Target>::to(e.target, device));
  }
  /// Data and targets gathered on `device`.
  static Example gather(const std::vector<Example>& parts, const c10::Device& device) {
    std::vector<Data> data;
    std::vector<Target> targets;
    for (const auto& part : parts) {
      data.push_back(part.data);
      targets.push_back(part.target);
    }
    return Example(BatchTraits<Data>::gather(data, device), BatchTraits<Target>::gather(targets, device));
  }
};

/// An example without target (torch::data::TensorExample): just its data.
template <class Data>
struct BatchTraits<torch::data::Example<Data, torch::data::example::NoTarget>> {
  /// The example type.
  using Example = torch::data::Example<Data, torch::data::example::NoTarget>;
  /// Samples of the data.
  static std::int64_t size(const Example& e) { return BatchTraits<Data>::size(e.data); }
  /// Samples [begin, end) of the data.
  static Example slice(const Example& e, std::int64_t begin, std::int64_t end) {
    return Example(BatchTraits<Data>::slice(e.data, begin, end));
  }
  /// The data on `device`.
  static Example to(const Example& e, const c10::Device& device) { return Example(BatchTraits<Data>::to(e.data, device)); }
  /// The data gathered on `device`.
  static Example gather(const std::vector<Example>& parts, const c10::Device& device) {
    std::vector<Data> data;
    for (const auto& part : parts) data.push_back(part.data);
    return Example(BatchTraits<Data>::gather(data, device));
  }
};

/// A std::vector of samples: one element per sample.
template <class T, class Allocator>
struct BatchTraits<std::vector<T, Allocator>> {
  /// The list type.
  using List = std::vector<T, Allocator>;
  /// Samples: the number of elements.
  static std::int64_t size(const List& list) { return static_cast<std::int64_t>(list.size()); }
  /// Elements [begin, end).
  static List slice(const List& list, std::int64_t begin, std::int64_t end) {
    return List(list.begin() + begin, list.begin() + end);
  }
  /// Every element on `device`.
  static List to(const List& list, const c10::Device& device) {
    List moved;
    moved.reserve(list.size());
    for (const auto& sample : list) moved.push_back(BatchTraits<T>::to(sample, device));
    return moved;
  }
  /// The parts joined, in order.
  static List gather(const std::vector<List>& parts, const c10::Device& device) {
    List joined;
    for (const auto& part : parts) {
      for (const auto& sample : part) joined.push_back(BatchTraits<T>::to(sample, device));
    }
    return joined;
  }
};

/// A std::tuple of fields, each split along its samples (they must agree on the count).
template <class... Fields>
struct BatchTraits<std::tuple<Fields...>> {
  /// The tuple type.
  using Tuple = std::tuple<Fields...>;
  /// Samples, on which every field agrees.
  static std::int64_t size(const Tuple& t) {
    return detail::agree_on_size(
        std::apply([](const auto&... f) { return std::vector<std::int64_t>{batch_size(f)...}; }, t), "std::tuple");
  }
  /// Samples [begin, end) of every field.
  static Tuple slice(const Tuple& t, std::int64_t begin, std::int64_t end) {
    return std::apply(
        [&](const auto&... f) { return Tuple(BatchTraits<std::decay_t<decltype(f)>>::slice(f, begin, end)...); }, t);
  }
  /// Every field on `device`.
  static Tuple to(const Tuple& t, const c10::Device& device) {
    return std::apply([&](const auto&... f) { return Tuple(BatchTraits<std::decay_t<decltype(f)>>::to(f, device)...); },
                      t);
  }
  /// Every field gathered on `device`.
  static Tuple gather(const std::vector<Tuple>& parts, const c10::Device& device) {
    return gather_fields(parts, device, std::index_sequence_for<Fields...>{});
  }

 private:
  template <std::size_t... I>
  static Tuple gather_fields(const std::vector<Tuple>& parts, const c10::Device& device, std::index_sequence<I...>) {
    return Tuple(gather_field<I>(parts, device)...);
  }
  template <std::size_t I>
  static std::tuple_element_t<I, Tuple> gather_field(const std::vector<Tuple>& parts, const c10::Device& device) {
    using Field = std::tuple_element_t<I, Tuple>;
    std::vector<Field> fields;
    for (const auto& part : parts) fields.push_back(std::get<I>(part));
    return BatchTraits<Field>::gather(fields, device);
  }
};

/// A std::pair of fields, each split along its samples (they must agree on the count).
template <class First, class Second>
struct BatchTraits<std::pair<First, Second>> {
  /// The pair type.
  using Pair = std::pair<First, Second>;
  /// Samples, on which both fields agree.
  static std::int64_t size(const Pair& p) {
    return detail::agree_on_size({batch_size(p.first), batch_size(p.second)}, "std::pair");
  }
  /// Samples [begin, end) of both fields.
  static Pair slice(const Pair& p, std::int64_t begin, std::int64_t end) {
    return Pair(BatchTraits<First>::slice(p.first, begin, end), BatchTraits<Second>::slice(p.second, begin, end));
  }
  /// Both fields on `device`.
  static Pair to(const Pair& p, const c10::Device& device) {
    return Pair(BatchTraits<First>::to(p.first, device), BatchTraits<Second>::to(p.second, device));
  }
  /// Both fields gathered on `device`.
  static Pair gather(const std::vector<Pair>& parts, const c10::Device& device) {
    std::vector<First> firsts;
    std::vector<Second> seconds;
    for (const auto& part : parts) {
      firsts.push_back(part.first);
      seconds.push_back(part.second);
    }
    return Pair(BatchTraits<First>::gather(firsts, device), BatchTraits<Second>::gather(seconds, device));
  }
};

// ---------------------------------------------------------------------------
// Definitions

namespace detail {

/// Calls `fn(const at::Tensor&)` on every tensor of a value: a tensor, or a
/// std::vector, std::tuple, std::pair or torch::data::Example of them,
/// nested, or a type whose BatchTraits has for_each_tensor. visit() returns
/// false where it met a type it cannot look into (the tensors it could see
/// were still visited).
template <class T, class Enable = void>
struct TensorsOf {
  template <class Fn>
  static bool visit(const T& /*value*/, Fn& /*fn*/) {
    return false;
  }
};

/// TensorsOf<T>::visit: false where `value` holds a type it cannot see into.
template <class T>
bool visit_tensors(const T& value, const std::function<void(const at::Tensor&)>& fn) {
  return TensorsOf<T>::visit(value, fn);
}

template <>
struct TensorsOf<at::Tensor> {
  template <class Fn>
  static bool visit(const at::Tensor& tensor, Fn& fn) {
    fn(tensor);
    return true;
  }
};

template <class T, class Allocator>
struct TensorsOf<std::vector<T, Allocator>> {
  template <class Fn>
  static bool visit(const std::vector<T, Allocator>& list, Fn& fn) {
    bool all = true;
    for (const auto& element : list) all = TensorsOf<T>::visit(element, fn) && all;
    return all;
  }
};

template <class... Fields>
struct TensorsOf<std::tuple<Fields...>> {
  template <class Fn>
  static bool visit(const std::tuple<Fields...>& fields, Fn& fn) {
    return std::apply(
        [&](const auto&... field) {
          bool all = true;
          ((all = TensorsOf<std::decay_t<decltype(field)>>::visit(field, fn) && all), ...);
          return all;
        },
        fields);
  }
};

template <class First, class Second>
struct TensorsOf<std::pair<First, Second>> {
  template <class Fn>
  static bool visit(const std::pair<First, Second>& pair, Fn& fn) {
    const bool first = TensorsOf<First>::visit(pair.first, fn);
    return TensorsOf<Second>::visit(pair.second, fn) && first;
  }
};

template <class Data, class Target>
struct TensorsOf<torch::data::Example<Data, Target>> {
  template <class Fn>
  static bool visit(const torch::data::Example<Data, Target>& example, Fn& fn) {
    const bool data = TensorsOf<Data>::visit(example.data, fn);
    return TensorsOf<Target>::visit(example.target, fn) && data;
  }
};

template <class Data>
struct TensorsOf<torch::data::Example<Data, torch::data::example::NoTarget>> {
  template <class Fn>
  static bool visit(const torch::data::Example<Data, torch::data::example::NoTarget>& example, Fn& fn) {
    return TensorsOf<Data>::visit(example.data, fn);
  }
};

/// A type of yours whose BatchTraits lists its tensors.
template <class T>
struct TensorsOf<T, std::void_t<decltype(BatchTraits<T>::for_each_tensor(
                        std::declval<const T&>(), std::declval<const std::function<void(const at::Tensor&)>&>()))>> {
  template <class Fn>
  static bool visit(const T& value, Fn& fn) {
    BatchTraits<T>::for_each_tensor(value, std::function<void(const at::Tensor&)>(std::ref(fn)));
    return true;
  }
};

}  // namespace detail

template <class Batch>
std::vector<Batch> split_shards(const Batch& batch, const std::vector<std::int64_t>& sizes) {
  const std::int64_t total = batch_size(batch);
  std::int64_t sum = 0;
  for (auto size : sizes) {
    if (size < 0) throw Error(fmt::format("split_shards: shard size {} is negative", size));
    sum += size;
  }
  if (sum != total) {
    throw Error(fmt::format("split_shards: shard sizes add up to {}, but the batch has {} samples", sum, total));
  }
  std::vector<Batch> shards;
  shards.reserve(sizes.size());
  std::int64_t begin = 0;
  for (auto size : sizes) {
    shards.push_back(BatchTraits<Batch>::slice(batch, begin, begin + size));
    begin += size;
  }
  return shards;
}

}  // namespace multigpu
