// The bucket assignment policy (Note [Bucket assignment]) as pure functions:
// plain descriptions of parameters in, lists of parameter indices out.

#include "support.hpp"  // first: see its comment

#include <cstddef>
#include <cstdint>
#include <vector>

#include "multigpu/data_parallel/bucket_assignment.hpp"

namespace {

using multigpu::detail::assign_buckets;
using multigpu::detail::BucketCaps;
using multigpu::detail::BucketedParameter;
using multigpu::detail::ready_order_first;
using multigpu::detail::reverse_registration_order;
using Buckets = std::vector<std::vector<std::size_t>>;
using Order = std::vector<std::size_t>;

BucketedParameter param(std::int64_t bytes, c10::ScalarType dtype = c10::ScalarType::Float,
                        c10::Device device = c10::Device("cpu")) {
  return BucketedParameter{bytes, dtype, device};
}

BucketCaps caps(std::int64_t bytes) { return BucketCaps{bytes, bytes}; }

}  // namespace

TEST_SUITE("bucket assignment") {
  TEST_CASE("no parameters, or none to assign: no buckets") {
    CHECK(assign_buckets({}, {}, caps(100)).empty());
    CHECK(assign_buckets({param(4), param(4)}, {}, caps(100)).empty());
    CHECK(reverse_registration_order(0).empty());
    CHECK(ready_order_first({}, 0).empty());
    CHECK(ready_order_first({0, 3}, 0).empty());
  }

  TEST_CASE("the first order is reverse registration order") {
    CHECK(reverse_registration_order(1) == Order{0});
    CHECK(reverse_registration_order(4) == Order{3, 2, 1, 0});
    const std::vector<BucketedParameter> four(4, param(16));
    CHECK(assign_buckets(four, reverse_registration_order(4), caps(1000)) == Buckets{{3, 2, 1, 0}});
  }

  TEST_CASE("a bucket fills up to the cap: exactly at it is not over it") {
    const std::vector<BucketedParameter> five(5, param(16));
    const Order order = reverse_registration_order(5);
    CHECK(assign_buckets(five, order, caps(32)) == Buckets{{4, 3}, {2, 1}, {0}});
    CHECK(assign_buckets(five, order, caps(47)) == Buckets{{4, 3}, {2, 1}, {0}});
    CHECK(assign_buckets(five, order, caps(48)) == Buckets{{4, 3, 2}, {1, 0}});
    CHECK(assign_buckets(five, order, caps(15)) == Buckets{{4}, {3}, {2}, {1}, {0}});
  }

  TEST_CASE("a parameter larger than the cap is alone in its bucket") {
    const std::vector<BucketedParameter> params{param(8), param(100), param(8), param(8)};
    CHECK(assign_buckets(params, {0, 1, 2, 3}, caps(20)) == Buckets{{0}, {1}, {2, 3}});
    CHECK(assign_buckets(params, {1, 0, 2, 3}, caps(20)) == Buckets{{1}, {0, 2}, {3}});
    CHECK(assign_buckets(params, {0, 2, 3, 1}, caps(20)) == Buckets{{0, 2}, {3}, {1}});
  }

  TEST_CASE("the first bucket has a cap of its own") {
    const std::vector<BucketedParameter> six(6, param(16));
    const Order order = reverse_registration_order(6);
    CHECK(assign_buckets(six, order, BucketCaps{64, 16}) == Buckets{{5}, {4, 3, 2, 1}, {0}});
    CHECK(assign_buckets(six, order, BucketCaps{32, 48}) == Buckets{{5, 4, 3}, {2, 1}, {0}});
    // Each (dtype, device) group's first bucket: here the doubles' too.
    const std::vector<BucketedParameter> mixed{param(16), param(16, c10::ScalarType::Double), param(16),
                                               param(16, c10::ScalarType::Double)};
    CHECK(assign_buckets(mixed, {0, 1, 2, 3}, BucketCaps{64, 16}) == Buckets{{0}, {1}, {2}, {3}});
  }

  TEST_CASE("mixed dtypes never share a bucket, and buckets are numbered in the order they open") {
    const auto f = c10::ScalarType::Float;
    const auto d = c10::ScalarType::Double;
    const auto h = c10::ScalarType::Half;
    const std::vector<BucketedParameter> params{param(16, f), param(16, d), param(16, f), param(16, d),
                                                param(16, f), param(8, h)};
    CHECK(assign_buckets(params, {0, 1, 2, 3, 4, 5}, caps(1000)) == Buckets{{0, 2, 4}, {1, 3}, {5}});
    // A full float bucket closes; the double one stays open.
    CHECK(assign_buckets(params, {0, 1, 2, 3, 4, 5}, caps(32)) == Buckets{{0, 2}, {1, 3}, {4}, {5}});
    CHECK(assign_buckets(params, {5, 4, 3, 2, 1, 0}, caps(32)) == Buckets{{5}, {4, 2}, {3, 1}, {0}});
  }

  TEST_CASE("parameters on different devices never share a bucket") {
    const auto f = c10::ScalarType::Float;
    const std::vector<BucketedParameter> params{param(16, f, c10::Device("cuda:0")), param(16, f, c10::Device("cuda:1")),
                                                param(16, f, c10::Device("cpu")), param(16, f, c10::Device("cuda:0")),
                                                param(16, f, c10::Device("cuda:1"))};
    CHECK(assign_buckets(params, {0, 1, 2, 3, 4}, caps(1000)) == Buckets{{0, 3}, {1, 4}, {2}});
    // The same dtype on one device shares, whatever the others do.
    CHECK(assign_buckets(params, {4, 3, 2, 1, 0}, caps(32)) == Buckets{{4, 1}, {3, 0}, {2}});
  }

  TEST_CASE("the rebuilt order: the recorded ready order first, then the rest in reverse registration order") {
    CHECK(ready_order_first({1, 3}, 5) == Order{1, 3, 4, 2, 0});
    CHECK(ready_order_first({}, 3) == Order{2, 1, 0});
    CHECK(ready_order_first({0, 1, 2}, 3) == Order{0, 1, 2});
    // Repeats count once, where first seen; indices out of range are ignored.
    CHECK(ready_order_first({2, 0, 2, 7, 0}, 4) == Order{2, 0, 3, 1});

    // Registered a.weight, a.bias, b.weight, b.bias; backward reached a first.
    const std::vector<BucketedParameter> params{param(40), param(8), param(60), param(20)};
    CHECK(assign_buckets(params, reverse_registration_order(4), caps(64)) == Buckets{{3}, {2}, {1, 0}});
    CHECK(assign_buckets(params, ready_order_first({1, 0, 3, 2}, 4), caps(64)) == Buckets{{1, 0}, {3}, {2}});
    // b got no gradient in the first step: it goes last, b.bias first.
    CHECK(assign_buckets(params, ready_order_first({0, 1}, 4), caps(64)) == Buckets{{0, 1}, {3}, {2}});
  }
}
