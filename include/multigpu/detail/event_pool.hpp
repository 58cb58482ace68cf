#pragma once
// A process-wide pool of device events, so that ordering streams does not
// create and destroy an event each time.
//
// Note [Event pool]
// ~~~~~~~~~~~~~~~~~
// Some orderings need an event for one use only: the completion of each
// collective (nccl/communicator.hpp, kept until the watchdog sees it done),
// joining the streams of replicas that share a GPU (ReplicaStreamsCurrent),
// the loss of each step (StepLoss). Creating and destroying a CUDA event
// are driver calls (and take the driver's locks); at several per GPU per
// step that is host time on the launch-bound path. As
// PyTorch's caching allocator and ProcessGroupNCCL do (their event pools),
// an event that is no longer needed goes back to a free list per device and
// is recorded again by the next user. Recording again is safe: a
// cudaStreamWaitEvent or cudaEventQuery issued before applies to the record
// it saw, and an event goes back only when its owner no longer waits on it
// or queries it. The pool is never destroyed (events handed out may come
// back during static destruction); it holds at most as many events as were
// in use at once. Events that live as long as their owner (StreamFence's,
// the gradient buckets') are simply kept by their owner.

#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#include <c10/core/Device.h>
#include <c10/core/Event.h>

namespace multigpu {
namespace detail {

class EventPool {
 public:
  /// Gives an event back to the pool it came from.
  struct Return {
    c10::Device device{c10::DeviceType::CPU};
    void operator()(c10::Event* event) const noexcept { EventPool::instance().put(device, event); }
  };
  /// An event of the pool: returned to it when destroyed.
  using Event = std::unique_ptr<c10::Event, Return>;

  /// The process's pool. See Note [Event pool].
  static EventPool& instance() {
    static EventPool* const pool = new EventPool();  // never destroyed: see the Note
    return *pool;
  }

  /// An event for streams of `device` (a GPU): a free one, or a new one.
  /// Thread-safe.
  Event get(const c10::Device& device) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (auto& entry : free_) {
        if (entry.first != device || entry.second.empty()) continue;
        std::unique_ptr<c10::Event> event = std::move(entry.second.back());
        entry.second.pop_back();
        return Event(event.release(), Return{device});
      }
    }
    return Event(new c10::Event(device.type()), Return{device});
  }

  /// Free events held for `device` (for tests).
  std::size_t free_events(const c10::Device& device) const {
    std::lock_guard<std::mutex> lock(mutex_);
    for (const auto& entry : free_) {
      if (entry.first == device) return entry.second.size();
    }
    return 0;
  }

 private:
  EventPool() = default;

  void put(const c10::Device& device, c10::Event* event) noexcept {
    std::unique_ptr<c10::Event> owned(event);
    try {
      std::lock_guard<std::mutex> lock(mutex_);
      for (auto& entry : free_) {
        if (entry.first != device) continue;
        entry.second.push_back(std::move(owned));
        return;
      }
      free_.emplace_back(device, std::vector<std::unique_ptr<c10::Event>>{});
      free_.back().second.push_back(std::move(owned));
    } catch (...) {
      // Out of memory for the list: the event is destroyed instead of kept.
    }
  }

  mutable std::mutex mutex_;
  std::vector<std::pair<c10::Device, std::vector<std::unique_ptr<c10::Event>>>> free_;  // per device
};

/// An event of the process's pool for streams of `device`. See Note [Event pool].
inline EventPool::Event pooled_event(const c10::Device& device) { return EventPool::instance().get(device); }

}  // namespace detail
}  // namespace multigpu
