#pragma once
// A small network of 2 or 3 hosts on this machine, made of Linux network
// namespaces, for the multi-process tests that need a real network (not
// loopback). See Note [Test hosts in network namespaces].

#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <csignal>
#include <cstdio>
#include <iostream>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <fmt/core.h>

#include "multigpu/scheduler/process.hpp"

namespace multigpu_test {

// Note [Test hosts in network namespaces]
// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
// NetNamespaces(n) makes n hosts, each a network namespace with its own
// loopback and one interface, "wire", holding 198.51.100.<i+1>/24 (a
// documentation range, RFC 5737), and one more namespace holding a bridge
// that every host's wire is plugged into (a veth pair: "wire" in the host,
// "port<i>" on the bridge). Nothing is made in the machine's own network
// namespace, and no namespace has a default route: traffic stays between
// the hosts. Names start with "multigpu-test-<pid>-" (the test's pid), so
// that tests running at the same time never meet. The destructor kills every
// process started with start() (by its pid, its process group), then deletes
// each link and namespace it made, by name, whether the test passed, failed
// or threw. A test process that is killed (a CI time-out, SIGKILL) runs no
// destructor: its processes are ended by their supervisors (ChildProcess
// ends its command when the test process dies), and its namespaces are
// removed by the next NetNamespaces made on the machine, which deletes every
// "multigpu-test-<pid>-" namespace whose pid no longer runs, killing what
// still runs inside it first. Needs root and iproute2's `ip`; why_not() says
// why it cannot run.

/// The exit status and output (stdout and stderr together) of a shell command.
struct CommandResult {
  int status = -1;
  std::string output;
};

/// Runs `command` with sh, its stderr joined to its stdout.
inline CommandResult run_command(const std::string& command) {
  CommandResult result;
  FILE* pipe = ::popen((command + " 2>&1").c_str(), "r");
  if (pipe == nullptr) return result;
  char buffer[512];
  while (std::fgets(buffer, sizeof(buffer), pipe) != nullptr) result.output += buffer;
  const int status = ::pclose(pipe);
  result.status = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return result;
}

/// Hosts on a private network of namespaces (see Note [Test hosts in network namespaces]).
class NetNamespaces {
 public:
  /// Why these tests cannot run here ("" when they can): not root, no `ip`,
  /// or a namespace cannot be made (a container without CAP_SYS_ADMIN).
  static std::string why_not() {
    if (::geteuid() != 0) return "network namespaces need root";
    if (run_command("command -v ip").status != 0) return "iproute2's `ip` is not installed";
    const std::string probe = fmt::format("{}probe", prefix_of(::getpid()));
    const CommandResult made = run_command(fmt::format("ip netns add {}", probe));
    if (made.status != 0) return "cannot make a network namespace: " + made.output;
    run_command(fmt::format("ip netns del {}", probe));
    return "";
  }

  /// Makes `hosts` hosts on one bridge; throws std::runtime_error naming the
  /// command that failed (whatever was made so far is removed).
  explicit NetNamespaces(int hosts) : prefix_(prefix_of(::getpid())) {
    remove_leftovers();
    try {
      make(bridge(), fmt::format("ip netns add {}", bridge()));
      must(fmt::format("ip -n {} link set lo up", bridge()));
      must(fmt::format("ip -n {} link add br0 type bridge", bridge()));
      must(fmt::format("ip -n {} link set br0 up", bridge()));
      for (int i = 0; i < hosts; ++i) {
        make(host(i), fmt::format("ip netns add {}", host(i)));
        must(fmt::format("ip -n {} link add {} type veth peer name wire netns {}", bridge(), port(i), host(i)));
        ports_.push_back(port(i));
        must(fmt::format("ip -n {} link set {} master br0 up", bridge(), port(i)));
        must(fmt::format("ip -n {} link set lo up", host(i)));
        must(fmt::format("ip -n {} addr add {}/24 dev wire", host(i), address(i)));
        must(fmt::format("ip -n {} link set wire up", host(i)));
      }
    } catch (...) {
      remove();
      throw;
    }
  }
  ~NetNamespaces() { remove(); }
  NetNamespaces(const NetNamespaces&) = delete;
  NetNamespaces& operator=(const NetNamespaces&) = delete;

  /// Host `i`'s namespace.
  std::string host(int i) const { return fmt::format("{}h{}", prefix_, i); }
  /// Host `i`'s address, on its interface "wire".
  static std::string address(int i) { return fmt::format("198.51.100.{}", i + 1); }
  /// The bridge's namespace.
  std::string bridge() const { return prefix_ + "br"; }
  /// Host `i`'s port on the bridge (in bridge()'s namespace).
  static std::string port(int i) { return fmt::format("port{}", i); }

  /// Runs `command` (a shell command line) in host `i`'s namespace, with
  /// `environment`, its output appended to `log`. Killed at destruction.
  multigpu::detail::ChildProcess& start(int i, const std::string& command, const std::vector<std::string>& environment,
                                        const std::string& log) {
    children_.push_back(std::make_unique<multigpu::detail::ChildProcess>(
        fmt::format("exec ip netns exec {} {}", host(i), command), environment, log));
    return *children_.back();
  }

  /// Cuts host `i` off the bridge (or plugs it back).
  void set_link(int i, bool up) {
    must(fmt::format("ip -n {} link set {} {}", bridge(), port(i), up ? "up" : "down"));
  }

  /// Runs `command` and throws std::runtime_error with its output when it fails.
  static void must(const std::string& command) {
    const CommandResult result = run_command(command);
    if (result.status != 0) {
      throw std::runtime_error(fmt::format("`{}` failed ({}): {}", command, result.status, result.output));
    }
  }

 private:
  void make(const std::string& name, const std::string& command) {
    must(command);
    namespaces_.push_back(name);
  }

  static std::string prefix_of(pid_t pid) { return fmt::format("multigpu-test-{}-", pid); }

  /// The lines of `command`'s output (none when it fails).
  static std::vector<std::string> lines_of(const std::string& command) {
    const CommandResult result = run_command(command);
    std::vector<std::string> lines;
    if (result.status != 0) return lines;
    for (std::size_t begin = 0; begin < result.output.size();) {
      const std::size_t end = std::min(result.output.find('\n', begin), result.output.size());
      if (end > begin) lines.push_back(result.output.substr(begin, end - begin));
      begin = end + 1;
    }
    return lines;
  }

  /// Kills whatever runs in namespace `name` (it is ours: started inside it).
  static void kill_inside(const std::string& name) noexcept {
    for (const auto& pid : lines_of(fmt::format("ip netns pids {}", name))) {
      if (pid.find_first_not_of("0123456789") == std::string::npos) ::kill(static_cast<pid_t>(std::stol(pid)), SIGKILL);
    }
  }

  /// Removes the namespaces of test processes that were killed before their
  /// destructor ran (see Note [Test hosts in network namespaces]).
  static void remove_leftovers() noexcept {
    const std::string prefix = "multigpu-test-";
    for (const auto& line : lines_of("ip netns list")) {
      const std::string name = line.substr(0, line.find(' '));  // "NAME (id: 3)"
      if (name.rfind(prefix, 0) != 0) continue;
      const std::string digits = name.substr(prefix.size(), name.find('-', prefix.size()) - prefix.size());
      if (digits.empty() || digits.find_first_not_of("0123456789") != std::string::npos) continue;
      const auto owner = static_cast<pid_t>(std::stol(digits));
      if (owner == ::getpid() || ::kill(owner, 0) == 0 || errno != ESRCH) continue;
      kill_inside(name);
      run_command("ip netns del " + name);  // its veth ends go with it, and their peers
    }
  }

  void remove() noexcept {
    children_.clear();  // each ChildProcess kills its process group by pid
    for (const auto& name : namespaces_) kill_inside(name);
    for (const auto& name : ports_) run_command(fmt::format("ip -n {} link del {}", bridge(), name));
    ports_.clear();
    for (auto it = namespaces_.rbegin(); it != namespaces_.rend(); ++it) run_command("ip netns del " + *it);
    namespaces_.clear();
  }

  std::string prefix_;
  std::vector<std::string> namespaces_;  // made so far, by name
  std::vector<std::string> ports_;       // veth pairs made so far, by their bridge end
  std::vector<std::unique_ptr<multigpu::detail::ChildProcess>> children_;
};

/// Ends a test that needs network namespaces where they cannot be made:
/// a doctest message, and the line by which ctest reports it skipped.
#define MULTIGPU_TEST_NEEDS_NET_NAMESPACES()                                              \
  do {                                                                                    \
    const std::string multigpu_why_not_ = ::multigpu_test::NetNamespaces::why_not();      \
    if (!multigpu_why_not_.empty()) {                                                     \
      MESSAGE("skipped: " << multigpu_why_not_);                                          \
      std::cout << "multigpu test skipped: " << multigpu_why_not_ << std::endl;           \
      return;                                                                             \
    }                                                                                     \
  } while (false)

}  // namespace multigpu_test
