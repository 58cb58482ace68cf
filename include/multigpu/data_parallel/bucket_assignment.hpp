#pragma once
// Which trainable parameters share a gradient bucket: the policy, as pure
// functions over plain descriptions of the parameters. The reducer
// (gradient_reducer.hpp) takes their result and only allocates the buffers.
//
// Note [Bucket assignment]
// ~~~~~~~~~~~~~~~~~~~~~~~~
// A bucket is all-reduced as one collective as soon as its last gradient is
// in (Note [Overlapping the all-reduce with backward]), so the assignment
// decides both how many collectives a step costs and how early the first
// one starts. The parameters are walked in an order that should be the one
// backward produces their gradients in, and grouped thus:
// - Parameters of different dtypes, or on different devices, never share a
//   bucket: a bucket is one flat buffer. Each (dtype, device) group keeps
//   one open bucket; a parameter goes into its group's open bucket.
// - When the parameter would take the open bucket over the cap, the bucket
//   closes and the parameter opens a new one. A bucket exactly at the cap
//   is not over it; a parameter larger than the cap opens a bucket of its
//   own, which the next parameter then finds over the cap: it stays alone.
// - Each group's first bucket may have a cap of its own (DDP makes it
//   small, so that the first all-reduce starts early in backward). The
//   reducer gives it the same cap as the others.
// - Buckets are numbered in the order they open, which is the order they
//   are launched in.
// The first order is reverse registration order: modules usually run in
// the order they are registered, so backward reaches the last one first.
// That can be far from the order backward really follows (a module
// registered before the one it feeds, shared layers): then a bucket waits
// for a gradient that comes late and nothing overlaps. So, as DDP does, the
// reducer records the order in which replica 0's gradients became ready in
// the first overlapped step and assigns the buckets once more in that order
// (ready_order_first), before the second synchronising backward; parameters
// that got no gradient go last, in reverse registration order.

#include <cstddef>
#include <cstdint>
#include <map>
#include <utility>
#include <vector>

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

namespace multigpu {
namespace detail {

/// One trainable parameter, as the bucket assignment sees it.
struct BucketedParameter {
  std::int64_t bytes = 0;  ///< Size of its gradient in bytes (numel × element size).
  c10::ScalarType dtype = c10::ScalarType::Float;
  c10::Device device{c10::kCPU};
};

/// Bucket size limits, in bytes. See Note [Bucket assignment].
struct BucketCaps {
  std::int64_t bytes = std::int64_t{25} << 20;        ///< Every bucket's cap.
  std::int64_t first_bytes = std::int64_t{25} << 20;  ///< The cap of each (dtype, device) group's first bucket.
};

/// Per bucket, in launch order, the indices into `parameters` it holds, in
/// the order they are laid out. `order` lists the indices to assign (each
/// once); see Note [Bucket assignment].
inline std::vector<std::vector<std::size_t>> assign_buckets(const std::vector<BucketedParameter>& parameters,
                                                            const std::vector<std::size_t>& order,
                                                            const BucketCaps& caps) {
  struct Open {
    std::size_t index;  // into the result
    std::int64_t bytes;
    std::int64_t cap;
  };
  std::vector<std::vector<std::size_t>> buckets;
  // (dtype, device) -> its open bucket. Devices compare by type, then index.
  std::map<std::pair<c10::ScalarType, std::pair<int, int>>, Open> open;
  for (std::size_t k : order) {
    const BucketedParameter& p = parameters[k];
    const auto group =
        std::make_pair(p.dtype, std::make_pair(static_cast<int>(p.device.type()), static_cast<int>(p.device.index())));
    auto found = open.find(group);
    if (found == open.end()) {
      found = open.emplace(group, Open{buckets.size(), 0, caps.first_bytes}).first;
      buckets.emplace_back();
    } else if (found->second.bytes + p.bytes > found->second.cap) {
      found->second = Open{buckets.size(), 0, caps.bytes};
      buckets.emplace_back();
    }
    buckets[found->second.index].push_back(k);
    found->second.bytes += p.bytes;
  }
  return buckets;
}

/// The first order: 0..n-1 reversed (see Note [Bucket assignment]).
inline std::vector<std::size_t> reverse_registration_order(std::size_t n) {
  std::vector<std::size_t> order;
  order.reserve(n);
  for (std::size_t k = n; k-- > 0;) order.push_back(k);
  return order;
}

/// The order of the rebuilt buckets: the parameters of `ready` (the order
/// their gradients became ready; repeats and indices not below n are
/// ignored), then the others in reverse registration order. See Note
/// [Bucket assignment].
inline std::vector<std::size_t> ready_order_first(const std::vector<std::size_t>& ready, std::size_t n) {
  std::vector<std::size_t> order;
  order.reserve(n);
  std::vector<char> placed(n, 0);
  for (std::size_t k : ready) {
    if (k < n && placed[k] == 0) {
      order.push_back(k);
      placed[k] = 1;
    }
  }
  for (std::size_t k = n; k-- > 0;) {
    if (placed[k] == 0) order.push_back(k);
  }
  return order;
}

}  // namespace detail
}  // namespace multigpu
