#pragma once
/// @file
/// Where this process stands in a multi-process job, read from what the
/// launcher put in the environment. Torch-free and cheap to include; the
/// rendezvous and the collectives are in multigpu/distributed.hpp.
///
/// Launchers, in the order they are looked for (the first one with any of
/// its variables set is the one used; explicit DistributedOptions fields
/// override single values):
///   torchrun        RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, GROUP_RANK
///   one per machine NODE_RANK, NNODES (with RANK/WORLD_SIZE absent: one
///                   process per machine, each driving all its devices)
///   SLURM (srun)    SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_NODEID,
///                   SLURM_NNODES, SLURM_NTASKS_PER_NODE
///   Open MPI        OMPI_COMM_WORLD_RANK, OMPI_COMM_WORLD_SIZE,
///                   OMPI_COMM_WORLD_LOCAL_RANK, OMPI_COMM_WORLD_LOCAL_SIZE
/// and, for every launcher with more than one process, MASTER_ADDR and
/// MASTER_PORT: where rank 0 listens for the rendezvous.

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include <fmt/core.h>

#include "multigpu/error.hpp"

namespace multigpu {

/// What a program may decide itself instead of the environment.
struct DistributedOptions {
  std::optional<int> rank;              ///< This process's rank, 0..world_size-1.
  std::optional<int> world_size;        ///< Processes in the job.
  std::optional<int> local_rank;        ///< This process's rank on its machine.
  std::optional<int> local_world_size;  ///< Processes on this machine.
  /// Host of rank 0's store (MASTER_ADDR).
  std::optional<std::string> master_addr;
  /// Port of rank 0's store (MASTER_PORT).
  std::optional<int> master_port;
  /// A rendezvous, collective or peer that takes longer fails with a
  /// DistributedError instead of hanging.
  std::chrono::milliseconds timeout = std::chrono::minutes(5);
  /// Collectives kept in the process's trace (0: none); see Note [The
  /// collective trace] in multigpu/collective_trace.hpp.
  std::size_t trace_size = 2000;
};

/// This process's place in the job (see the file comment).
struct DistributedEnv {
  /// This process's rank, 0..world_size-1.
  int rank = 0;
  /// Processes in the job.
  int world_size = 1;
  /// This process's rank on its machine.
  int local_rank = 0;
  /// Processes on this machine.
  int local_world_size = 1;
  /// This machine's number, 0..nnodes-1.
  int node_rank = 0;
  /// Machines in the job.
  int nnodes = 1;
  /// Host of rank 0's store.
  std::string master_addr;
  /// Port of rank 0's store.
  int master_port = 0;
  /// "torchrun", "nodes", "slurm", "openmpi", "explicit" or "none".
  std::string launcher = "none";
  /// The variable the world size came from, for messages: "WORLD_SIZE", "SLURM_NTASKS"...
  std::string world_size_source = "world size";
  /// Where master_addr came from, for messages: "MASTER_ADDR" or "DistributedOptions::master_addr".
  std::string master_addr_source = "MASTER_ADDR";

  /// Whether the job has more than one process.
  bool distributed() const { return world_size > 1; }
  /// "rank 1 of 4 (local 1 of 2, node 0 of 2) from torchrun, rendezvous at 10.0.0.1:29500"
  std::string describe() const {
    if (!distributed()) return "a single process";
    return fmt::format("rank {} of {} (local {} of {}, node {} of {}) from {}, rendezvous at {}:{}", rank, world_size,
                       local_rank, local_world_size, node_rank, nnodes, launcher, master_addr, master_port);
  }
};

/// Looks up one environment variable (nullopt when unset).
using EnvLookup = std::function<std::optional<std::string>(const std::string&)>;

/// The real environment of this process.
inline EnvLookup process_environment() {
  return [](const std::string& name) -> std::optional<std::string> {
    const char* value = std::getenv(name.c_str());
    if (value == nullptr) return std::nullopt;
    return std::string(value);
  };
}

namespace detail {

/// One integer setting and where it came from.
struct EnvInt {
  std::optional<int> value;
  std::string source;  // variable name, or "DistributedOptions::rank"
};

inline std::optional<int> parse_env_int(const std::string& name, const std::string& text) {
  std::size_t begin = text.find_first_not_of(" \t");
  std::size_t end = text.find_last_not_of(" \t");
  if (begin == std::string::npos) {
    throw DistributedError(fmt::format("{} is set but empty; it must be a whole number", name));
  }
  const std::string trimmed = text.substr(begin, end - begin + 1);
  std::size_t used = 0;
  long long value = 0;
  try {
    value = std::stoll(trimmed, &used, 10);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used != trimmed.size() || value < -1000000000LL || value > 1000000000LL) {
    throw DistributedError(fmt::format("{}='{}' is not a whole number", name, text));
  }
  return static_cast<int>(value);
}

/// Reads `name` as an integer: nullopt when unset.
inline EnvInt env_int(const EnvLookup& lookup, const std::string& name) {
  const auto text = lookup(name);
  if (!text) return {std::nullopt, name};
  return {parse_env_int(name, *text), name};
}

/// SLURM_NTASKS_PER_NODE is "4" or, with uneven nodes, "4(x2),3": the first count.
inline EnvInt slurm_tasks_per_node(const EnvLookup& lookup) {
  const auto text = lookup("SLURM_NTASKS_PER_NODE");
  if (!text) return {std::nullopt, "SLURM_NTASKS_PER_NODE"};
  const std::size_t end = text->find_first_of("(,");
  return {parse_env_int("SLURM_NTASKS_PER_NODE", text->substr(0, end)), "SLURM_NTASKS_PER_NODE"};
}

inline void override_with(EnvInt& setting, const std::optional<int>& value, const char* field) {
  if (value) setting = {value, fmt::format("DistributedOptions::{}", field)};
}

inline std::string show(const EnvInt& setting) { return fmt::format("{}={}", setting.source, *setting.value); }

}  // namespace detail

/// Reads this process's place in the job from `lookup` (the process
/// environment by default), with `options` overriding single values. Without
/// any launcher variable: a single process. Throws DistributedError naming
/// the variable that is missing, malformed or inconsistent, and what is valid.
inline DistributedEnv read_distributed_env(const DistributedOptions& options = {},
                                           const EnvLookup& lookup = process_environment()) {
  using detail::env_int;
  using detail::EnvInt;
  struct Launcher {
    const char* name;
    EnvInt rank, world_size, local_rank, local_world_size, node_rank, nnodes;
  };
  const auto any_set = [](const Launcher& l) {
    return l.rank.value || l.world_size.value || l.local_rank.value || l.local_world_size.value;
  };

  const EnvInt node_rank_var = env_int(lookup, "NODE_RANK");
  const EnvInt nnodes_var = env_int(lookup, "NNODES");
  const EnvInt group_rank_var = env_int(lookup, "GROUP_RANK");
  Launcher torchrun{"torchrun",
                    env_int(lookup, "RANK"),
                    env_int(lookup, "WORLD_SIZE"),
                    env_int(lookup, "LOCAL_RANK"),
                    env_int(lookup, "LOCAL_WORLD_SIZE"),
                    group_rank_var.value ? group_rank_var : node_rank_var,
                    nnodes_var};
  // One process per machine: NODE_RANK / NNODES name the process.
  Launcher nodes{"nodes",         node_rank_var, nnodes_var, {std::nullopt, "LOCAL_RANK"}, {std::nullopt, "LOCAL_WORLD_SIZE"},
                 node_rank_var, nnodes_var};
  Launcher slurm{"slurm",
                 env_int(lookup, "SLURM_PROCID"),
                 env_int(lookup, "SLURM_NTASKS"),
                 env_int(lookup, "SLURM_LOCALID"),
                 detail::slurm_tasks_per_node(lookup),
                 env_int(lookup, "SLURM_NODEID"),
                 env_int(lookup, "SLURM_NNODES")};
  Launcher openmpi{"openmpi",
                   env_int(lookup, "OMPI_COMM_WORLD_RANK"),
                   env_int(lookup, "OMPI_COMM_WORLD_SIZE"),
                   env_int(lookup, "OMPI_COMM_WORLD_LOCAL_RANK"),
                   env_int(lookup, "OMPI_COMM_WORLD_LOCAL_SIZE"),
                   node_rank_var,
                   nnodes_var};

  Launcher chosen{"none", {}, {}, {}, {}, {}, {}};
  if (any_set(torchrun)) {
    chosen = torchrun;
  } else if (any_set(nodes)) {
    chosen = nodes;
  } else if (any_set(slurm)) {
    chosen = slurm;
  } else if (any_set(openmpi)) {
    chosen = openmpi;
  }
  detail::override_with(chosen.rank, options.rank, "rank");
  detail::override_with(chosen.world_size, options.world_size, "world_size");
  detail::override_with(chosen.local_rank, options.local_rank, "local_rank");
  detail::override_with(chosen.local_world_size, options.local_world_size, "local_world_size");
  if (chosen.name == std::string("none") &&
      (options.rank || options.world_size || options.local_rank || options.local_world_size)) {
    chosen.name = "explicit";
  }

  DistributedEnv env;
  env.launcher = chosen.name;
  if (!chosen.rank.value && !chosen.world_size.value) {
    if (chosen.local_rank.value || chosen.local_world_size.value) {
      const EnvInt& set = chosen.local_rank.value ? chosen.local_rank : chosen.local_world_size;
      throw DistributedError(fmt::format("{} is set, but neither the rank nor the world size is ({} and {} are "
                                         "unset); a launcher sets all of them",
                                         detail::show(set), chosen.rank.source, chosen.world_size.source));
    }
    return env;  // a single process
  }
  if (!chosen.world_size.value) {
    throw DistributedError(fmt::format("{} is set but {} is not: every process needs the number of processes too",
                                       detail::show(chosen.rank), chosen.world_size.source));
  }
  if (*chosen.world_size.value < 1) {
    throw DistributedError(fmt::format("{}: it must be at least 1 (the number of processes in the job)",
                                       detail::show(chosen.world_size)));
  }
  if (!chosen.rank.value) {
    if (*chosen.world_size.value == 1) {
      chosen.rank = {0, chosen.rank.source};
    } else {
      throw DistributedError(fmt::format("{} is set but {} is not: every process needs its own rank, 0..{}",
                                         detail::show(chosen.world_size), chosen.rank.source,
                                         *chosen.world_size.value - 1));
    }
  }
  env.rank = *chosen.rank.value;
  env.world_size = *chosen.world_size.value;
  env.world_size_source = chosen.world_size.source;
  if (env.rank < 0 || env.rank >= env.world_size) {
    throw DistributedError(fmt::format("{} is out of range for {}: valid ranks are 0..{}", detail::show(chosen.rank),
                                       detail::show(chosen.world_size), env.world_size - 1));
  }

  // On this machine. Without local variables the process is taken to be
  // alone on its machine, driving all the devices it is given.
  env.local_rank = chosen.local_rank.value.value_or(0);
  if (chosen.local_world_size.value) {
    env.local_world_size = *chosen.local_world_size.value;
  } else if (chosen.nnodes.value && *chosen.nnodes.value > 0 && env.world_size % *chosen.nnodes.value == 0 &&
             chosen.local_rank.value) {
    env.local_world_size = env.world_size / *chosen.nnodes.value;
  } else {
    env.local_world_size = chosen.local_rank.value ? env.world_size : 1;
  }
  if (env.local_world_size < 1 || env.local_world_size > env.world_size) {
    throw DistributedError(fmt::format("{} is out of range: between 1 and {} processes can share a machine",
                                       detail::show(chosen.local_world_size), detail::show(chosen.world_size)));
  }
  if (env.local_rank < 0 || env.local_rank >= env.local_world_size) {
    throw DistributedError(fmt::format("{} is out of range for {} processes on this machine: valid local ranks are "
                                       "0..{}",
                                       detail::show(chosen.local_rank), env.local_world_size,
                                       env.local_world_size - 1));
  }
  env.nnodes = chosen.nnodes.value.value_or((env.world_size + env.local_world_size - 1) / env.local_world_size);
  env.node_rank = chosen.node_rank.value.value_or(env.rank / env.local_world_size);
  if (env.nnodes < 1 || env.nnodes > env.world_size) {
    throw DistributedError(fmt::format("{} is out of range: a job of {} processes has 1..{} machines",
                                       detail::show(chosen.nnodes), env.world_size, env.world_size));
  }
  if (env.node_rank < 0 || env.node_rank >= env.nnodes) {
    throw DistributedError(fmt::format("{} is out of range for {} machines: valid node ranks are 0..{}",
                                       detail::show(chosen.node_rank), env.nnodes, env.nnodes - 1));
  }

  // The rendezvous, needed only when there is someone to meet.
  const auto addr = options.master_addr ? options.master_addr : lookup("MASTER_ADDR");
  EnvInt port = env_int(lookup, "MASTER_PORT");
  detail::override_with(port, options.master_port, "master_port");
  if (env.distributed()) {
    if (!addr || addr->empty()) {
      throw DistributedError(fmt::format(
          "MASTER_ADDR is not set: with {} processes ({}), every process needs the host name or address of rank 0 "
          "(torchrun sets it; with srun or mpirun export it, e.g. MASTER_ADDR=$(hostname) on one machine)",
          env.world_size, detail::show(chosen.world_size)));
    }
    if (!port.value) {
      throw DistributedError(fmt::format("MASTER_PORT is not set: with {} processes every process needs the TCP "
                                         "port rank 0 listens on for the rendezvous (torchrun uses 29500)",
                                         env.world_size));
    }
    if (*port.value < 1 || *port.value > 65535) {
      throw DistributedError(fmt::format("{} is not a TCP port; valid ports are 1..65535", detail::show(port)));
    }
  }
  env.master_addr = addr.value_or("");
  if (options.master_addr) env.master_addr_source = "DistributedOptions::master_addr";
  env.master_port = port.value.value_or(0);
  return env;
}

}  // namespace multigpu
