#pragma once
// The rendezvous of a multi-process job, below ProcessGroup: finding the
// master's address, telling "nobody listens there" from "it listens but
// says nothing", and opening a TCPStore within a time limit. See Note
// [Rendezvous failures].

#include "multigpu/config.hpp"

#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <arpa/inet.h>
#include <fcntl.h>
#include <fmt/core.h>
#include <fmt/ranges.h>
#include <ifaddrs.h>
#include <net/if.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include "multigpu/distributed_env.hpp"
#include "multigpu/error.hpp"

#if MULTIGPU_WITH_DISTRIBUTED
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#endif

namespace multigpu {
namespace detail {

inline std::string this_host() {
  char name[256] = {};
  if (gethostname(name, sizeof(name) - 1) != 0) return "unknown host";
  return name;
}

/// The first line of an error (c10 errors carry a backtrace after it).
inline std::string first_line(const std::string& text) { return text.substr(0, text.find('\n')); }

/// The first line of the exception being handled, whatever its type: every
/// failure of c10d reaches the user as a DistributedError (c10d throws
/// c10::Error, std::system_error and std::runtime_error, depending on the
/// call and the LibTorch version).
inline std::string current_error() {
  try {
    throw;
  } catch (const std::exception& e) {
    return first_line(e.what());
  } catch (...) {
    return "an exception of unknown type";
  }
}

// Note [Rendezvous failures]
// A rendezvous that cannot succeed fails at once, on every rank it concerns;
// only a process that is really missing costs the time-out:
// - MASTER_ADDR is resolved (getaddrinfo) before anything else: a name that
//   does not resolve would otherwise look like an unreachable rank 0.
// - Before c10d's client connects, a rank other than 0 connects once itself
//   and listens briefly. A c10d store never speaks first nor closes an idle
//   connection, so a listener that does is another program on MASTER_PORT.
//   c10d would retry it until the time-out (LibTorch 2.x) or accept it, fail
//   on the first operation with a std::system_error and end the process from
//   its own thread (1.13).
// - A listener that accepts and then stays silent is no better: c10d's
//   client waits for its first answer without any time-out. The store is
//   therefore constructed on a thread of its own that the rank waits for at
//   most the time-out (and some grace, since c10d's own retries overrun it);
//   past that the thread is left to end when the peer does.
// - Processes started with different world sizes: the first rank to arrive
//   states its world size in the store (compare-and-set); every rank compares
//   with it before it checks in, and the one that disagrees leaves the
//   reason in the store. The others poll for it while they wait for the
//   missing ranks, so every rank is told at once what each one said. Rank 0,
//   which serves the store, leaves only after every rank that came has read it.
// - Every store operation, in the rendezvous, the heartbeat thread and the
//   destructor, catches whatever c10d throws: an exception escaping a thread
//   or a destructor would end the process.
// - c10d's store client waits for an answer without any time-out outside
//   wait() and get() (add(), check() and set() block in recv() until TCP
//   gives up, a quarter of an hour later), so a store whose host is cut off,
//   or stopped (SIGSTOP), would hang whoever asks. Every store operation
//   after the rendezvous (the heartbeat, the diagnosis of a failed
//   collective, the goodbye of the destructor) therefore runs through
//   finish_within(): on a thread of its own, waited for at most a limit,
//   and past it left to end when the peer does, owning what it touches
//   (copies, and shared pointers to the store and to the state it reports
//   to), so that it never touches the group or the caller's stack. Such
//   threads are few and bounded per group, never one per collective: two
//   store openings, the heartbeat, one diagnosis (the group refuses every
//   collective after its first failure) and one goodbye. One still blocked
//   when the process exits ends with it (exit() does not wait for detached
//   threads); only an answer arriving during the exit itself would run it
//   on, into c10d's error path, while static objects are destroyed.

/// getaddrinfo's answer, freed with it.
using AddressList = std::unique_ptr<addrinfo, decltype(&::freeaddrinfo)>;

/// The stream addresses of `env`'s MASTER_ADDR:MASTER_PORT; a DistributedError
/// naming the variable and its value when the name does not resolve.
inline AddressList resolve_master(const DistributedEnv& env) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* found = nullptr;
  const int status = ::getaddrinfo(env.master_addr.c_str(), std::to_string(env.master_port).c_str(), &hints, &found);
  if (status != 0) {
    throw DistributedError(fmt::format(
        "rank {}: {}='{}' is not a host name this machine can resolve ({}); set it to the host name or IP address of "
        "rank 0's machine, the same for every process",
        env.rank, env.master_addr_source, env.master_addr,
        status == EAI_SYSTEM ? std::strerror(errno) : ::gai_strerror(status)));
  }
  return AddressList(found, &::freeaddrinfo);
}

/// What a first connection to rank 0's address found.
struct ListenerProbe {
  bool connected = false;  ///< something accepted the connection
  std::string foreign;     ///< how it showed that it is not a c10d store ("" when it stayed silent, as a store does)
};

/// Connects to the first of `addresses` that answers within `connect_limit`
/// and watches the connection for `watch` (see Note [Rendezvous failures]).
/// Nothing listening yet is no error here: rank 0 may still be starting.
inline ListenerProbe probe_listener(const addrinfo* addresses, std::chrono::milliseconds connect_limit,
                                    std::chrono::milliseconds watch) {
  ListenerProbe probe;
  for (const addrinfo* address = addresses; address != nullptr && !probe.connected; address = address->ai_next) {
    const int fd = ::socket(address->ai_family, address->ai_socktype, address->ai_protocol);
    if (fd < 0) continue;
    ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) | O_NONBLOCK);
    if (::connect(fd, address->ai_addr, address->ai_addrlen) == 0) {
      probe.connected = true;
    } else if (errno == EINPROGRESS) {
      pollfd writable{fd, POLLOUT, 0};
      int error = 0;
      socklen_t length = sizeof(error);
      probe.connected = ::poll(&writable, 1, static_cast<int>(connect_limit.count())) == 1 &&
                        ::getsockopt(fd, SOL_SOCKET, SO_ERROR, &error, &length) == 0 && error == 0;
    }
    pollfd readable{fd, POLLIN, 0};
    if (probe.connected && ::poll(&readable, 1, static_cast<int>(watch.count())) == 1) {
      char bytes[48] = {};
      const ssize_t received = ::recv(fd, bytes, sizeof(bytes), 0);
      if (received > 0) {
        std::string text(bytes, static_cast<std::size_t>(received));
        for (char& c : text) c = c >= 0x20 && c < 0x7f ? c : '.';
        probe.foreign = fmt::format("it spoke first (\"{}\"), which a store never does", text);
      } else if (received == 0) {
        probe.foreign = "it accepted the connection and closed it at once";
      } else {
        probe.foreign = fmt::format("it reset the connection ({})", std::strerror(errno));
      }
    }
    ::close(fd);
  }
  return probe;
}

// Note [Choosing the network interface]
// Gloo connects every pair of processes directly, each listening on one
// address of its own that it publishes through the store; an address the
// others cannot reach makes the connection fail (or wait out the time-out).
// c10d's default device binds to the address this host's name resolves to,
// which on a machine with several networks (or in a container, or a network
// namespace) is often the wrong one or none. PyTorch answers "set
// GLOO_SOCKET_IFNAME"; we choose without help, as the one address that is
// sure to be right: the one this host reaches the master from.
// - GLOO_SOCKET_IFNAME set: its interfaces (comma-separated, one Gloo device
//   each, as PyTorch), and nothing else. An interface that does not exist is
//   an error naming it and the interfaces there are.
// - Otherwise: a UDP socket connected to MASTER_ADDR (connect() on a
//   datagram socket sends nothing; the kernel only picks the route and the
//   source address), whose local address getsockname() gives: the address,
//   and its interface, that the routing table uses towards the master. For
//   rank 0 that is MASTER_ADDR itself (or 127.0.0.1 over loopback, as before).
// - Where no route exists (which the store's connection would have shown
//   already), c10d's default device, saying so.
// The choice is said once per process, on stderr through log() (a line
// "rank R: Gloo uses ADDRESS on INTERFACE (why)"), with NCCL_SOCKET_IFNAME
// when it is set: NCCL reads that variable itself, and we pass it through.

/// Where this process's Gloo device listens (see Note [Choosing the network interface]).
struct NetworkChoice {
  std::vector<std::string> interfaces;  ///< GLOO_SOCKET_IFNAME's names, one device each (empty: `address`)
  std::string address;                  ///< the address to bind (empty with `interfaces`, or for c10d's default)
  std::string description;              ///< the line said to the user
};

/// Every interface of this host with an address: "lo (127.0.0.1), veth1 (198.51.100.2)".
inline std::string interfaces_here() {
  ifaddrs* list = nullptr;
  if (::getifaddrs(&list) != 0) return std::strerror(errno);
  std::vector<std::string> names;
  for (const ifaddrs* entry = list; entry != nullptr; entry = entry->ifa_next) {
    if (entry->ifa_addr == nullptr || entry->ifa_addr->sa_family != AF_INET) continue;
    char text[INET_ADDRSTRLEN] = {};
    ::inet_ntop(AF_INET, &reinterpret_cast<const sockaddr_in*>(entry->ifa_addr)->sin_addr, text, sizeof(text));
    names.push_back(fmt::format("{} ({})", entry->ifa_name, text));
  }
  ::freeifaddrs(list);
  return names.empty() ? "none with an IPv4 address" : fmt::format("{}", fmt::join(names, ", "));
}

/// The name of the interface that holds `address` ("" when none does).
inline std::string interface_holding(const sockaddr_storage& address) {
  ifaddrs* list = nullptr;
  if (::getifaddrs(&list) != 0) return "";
  std::string name;
  for (const ifaddrs* entry = list; entry != nullptr && name.empty(); entry = entry->ifa_next) {
    if (entry->ifa_addr == nullptr || entry->ifa_addr->sa_family != address.ss_family) continue;
    if (address.ss_family == AF_INET) {
      const auto* a = reinterpret_cast<const sockaddr_in*>(entry->ifa_addr);
      const auto* b = reinterpret_cast<const sockaddr_in*>(&address);
      if (a->sin_addr.s_addr == b->sin_addr.s_addr) name = entry->ifa_name;
    } else if (address.ss_family == AF_INET6) {
      const auto* a = reinterpret_cast<const sockaddr_in6*>(entry->ifa_addr);
      const auto* b = reinterpret_cast<const sockaddr_in6*>(&address);
      if (std::memcmp(&a->sin6_addr, &b->sin6_addr, sizeof(in6_addr)) == 0) name = entry->ifa_name;
    }
  }
  ::freeifaddrs(list);
  return name;
}

/// Where this process's Gloo device should listen (see Note [Choosing the
/// network interface]); `gloo_ifname` is GLOO_SOCKET_IFNAME's value, if set.
inline NetworkChoice choose_network(const DistributedEnv& env, const addrinfo* master, const char* gloo_ifname,
                                    const char* nccl_ifname) {
  NetworkChoice choice;
  const std::string nccl = nccl_ifname == nullptr ? "" : fmt::format("; NCCL_SOCKET_IFNAME={} for NCCL", nccl_ifname);
  if (gloo_ifname != nullptr && *gloo_ifname != '\0') {
    std::string names = gloo_ifname;
    for (std::size_t begin = 0; begin <= names.size();) {
      const std::size_t end = std::min(names.find(',', begin), names.size());
      if (end > begin) choice.interfaces.push_back(names.substr(begin, end - begin));
      begin = end + 1;
    }
    for (const auto& name : choice.interfaces) {
      if (::if_nametoindex(name.c_str()) == 0) {
        throw DistributedError(fmt::format("rank {}: GLOO_SOCKET_IFNAME='{}' names an interface this host does not "
                                           "have ('{}'); its interfaces are {}. Name one that reaches the other "
                                           "processes, or unset it to use the one that reaches {}={}",
                                           env.rank, names, name, interfaces_here(), env.master_addr_source,
                                           env.master_addr));
      }
    }
    choice.description = fmt::format("rank {}: Gloo uses interface {} (GLOO_SOCKET_IFNAME){}", env.rank,
                                     fmt::join(choice.interfaces, ", "), nccl);
    return choice;
  }
  std::string failure = "no address given";
  for (const addrinfo* address = master; address != nullptr; address = address->ai_next) {
    const int fd = ::socket(address->ai_family, SOCK_DGRAM, 0);
    if (fd < 0) continue;
    sockaddr_storage local{};
    socklen_t length = sizeof(local);
    const bool routed = ::connect(fd, address->ai_addr, address->ai_addrlen) == 0 &&
                        ::getsockname(fd, reinterpret_cast<sockaddr*>(&local), &length) == 0;
    if (!routed) failure = std::strerror(errno);
    ::close(fd);
    if (!routed) continue;
    char text[INET6_ADDRSTRLEN] = {};
    const void* bytes = local.ss_family == AF_INET
                            ? static_cast<const void*>(&reinterpret_cast<const sockaddr_in*>(&local)->sin_addr)
                            : static_cast<const void*>(&reinterpret_cast<const sockaddr_in6*>(&local)->sin6_addr);
    if (::inet_ntop(local.ss_family, bytes, text, sizeof(text)) == nullptr) continue;
    choice.address = text;
    const std::string name = interface_holding(local);
    choice.description = fmt::format("rank {}: Gloo uses {} on {} (the address this host reaches {}={} from; "
                                     "GLOO_SOCKET_IFNAME chooses another){}",
                                     env.rank, choice.address, name.empty() ? "an unnamed interface" : name,
                                     env.master_addr_source, env.master_addr, nccl);
    return choice;
  }
  choice.description = fmt::format("rank {}: Gloo uses the address of this host's name ({}), as c10d does: no route "
                                   "to {}={} ({}){}",
                                   env.rank, this_host(), env.master_addr_source, env.master_addr, failure, nccl);
  return choice;
}

/// Runs `fn` on a thread of its own and waits for it at most `limit`: true
/// when it ended in time (what it threw is rethrown here), false past the
/// limit, the thread then left to end on its own. `fn` must own whatever it
/// touches (copies, shared pointers): it may outlive the caller. See Note
/// [Rendezvous failures].
template <class Fn>
bool finish_within(std::chrono::milliseconds limit, Fn fn) {
  struct Attempt {
    std::mutex mutex;
    std::condition_variable done_cv;
    bool done = false;
    std::exception_ptr error;
  };
  auto attempt = std::make_shared<Attempt>();
  std::thread runner([attempt, fn = std::move(fn)]() mutable {
    std::exception_ptr error;
    try {
      fn();
    } catch (...) {
      error = std::current_exception();
    }
    std::lock_guard<std::mutex> lock(attempt->mutex);
    attempt->error = error;
    attempt->done = true;
    attempt->done_cv.notify_all();
  });
  std::unique_lock<std::mutex> lock(attempt->mutex);
  if (!attempt->done_cv.wait_for(lock, limit, [&] { return attempt->done; })) {
    runner.detach();
    return false;
  }
  lock.unlock();
  runner.join();
  if (attempt->error) std::rethrow_exception(attempt->error);
  return true;
}

#if MULTIGPU_WITH_DISTRIBUTED

/// A TCPStore constructed (and, for a client, asked once) on a thread of its own, waited for at most
/// `limit`: null past it, the thread left to end on its own (see Note
/// [Rendezvous failures]). What the constructor throws is rethrown here.
inline c10::intrusive_ptr<c10d::TCPStore> open_store_within(const std::string& host,
                                                            const c10d::TCPStoreOptions& options,
                                                            std::chrono::milliseconds limit) {
  auto store = std::make_shared<c10::intrusive_ptr<c10d::TCPStore>>();
  const bool opened = finish_within(limit, [store, host, options] {
    *store = c10::make_intrusive<c10d::TCPStore>(host, options);
    // One round trip, within the limit too: LibTorch 1.13's constructor
    // does not speak to the server, so a peer that accepts and never
    // answers would block the first store call instead, with no time-out.
    if (!options.isServer) (*store)->check({"multigpu/hello"});
  });
  if (!opened) return {};
  return std::move(*store);
}

#endif  // MULTIGPU_WITH_DISTRIBUTED

}  // namespace detail
}  // namespace multigpu
