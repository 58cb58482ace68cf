// The process's pool of device events (detail/event_pool.hpp). Its use on
// GPUs (collectives, streams, StepLoss) is tested in test_cuda.cpp.

#include "support.hpp"  // first: see its comment

#include <algorithm>
#include <cstddef>
#include <memory>

#include "multigpu/detail/event_pool.hpp"

TEST_CASE("event pool: an event given back is handed out again, per device") {
  auto& pool = multigpu::detail::EventPool::instance();
  // The pool does not look at the device type: CPU "devices" stand in for
  // GPUs here (their events are never recorded).
  const c10::Device one(c10::DeviceType::CPU, 0);
  const c10::Device other(c10::DeviceType::CPU);  // index -1: another key
  const std::size_t free_one = pool.free_events(one);
  c10::Event* first = nullptr;
  {
    const auto event = multigpu::detail::pooled_event(one);
    first = event.get();
    CHECK(pool.free_events(one) == (free_one == 0 ? 0 : free_one - 1));
  }
  CHECK(pool.free_events(one) == (free_one == 0 ? 1 : free_one));
  {
    const auto elsewhere = multigpu::detail::pooled_event(other);
    CHECK(elsewhere.get() != first);  // another device's list
    const auto again = multigpu::detail::pooled_event(one);
    CHECK(again.get() == first);
    const auto both = multigpu::detail::pooled_event(one);  // in use at once: a new one
    CHECK(both.get() != first);
  }
  CHECK(pool.free_events(one) == std::max<std::size_t>(free_one, 2));
  // A shared owner (StepLoss's) gives it back too: it takes the free one
  // `elsewhere` gave back, so a lost deleter would leave one fewer.
  const std::size_t free_other = pool.free_events(other);
  REQUIRE(free_other >= 1);
  { const std::shared_ptr<c10::Event> shared = multigpu::detail::pooled_event(other); }
  CHECK(pool.free_events(other) == free_other);
}
