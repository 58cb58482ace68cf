#pragma once
/// @file
/// Training over several processes and machines on LibTorch's own
/// distributed machinery: a c10d TCPStore for the rendezvous, c10d's
/// ProcessGroupGloo between processes on CPUs, and one NCCL communicator over
/// every GPU of every process (unique id passed through the store) on GPUs.
///
///   auto group = multigpu::ProcessGroup::from_environment();  // torchrun, srun, mpirun, or none
///   multigpu::DataParallel<Net> dp(net, devices, group->data_parallel_options());
///
/// Inside each process DataParallel drives that process's devices as usual;
/// its gradient all-reduce, and the broadcast of parameters and buffers from
/// global rank 0, reach every process. Without launcher variables the group
/// is a single process and changes nothing, so one program serves both.
///
/// Not part of multigpu.hpp: c10d's and Gloo's headers are heavy, and only
/// multi-process programs pay for them. Needs MULTIGPU_WITH_DISTRIBUTED (set
/// by CMake when LibTorch has c10d with Gloo and Gloo's headers are found);
/// without it a single process still works and more are a clear error.
///
/// Time-outs: the rendezvous, every collective and the wait for a peer fail
/// with a DistributedError after DistributedOptions::timeout; what cannot
/// succeed fails at once (see Note [Rendezvous failures]). The error names
/// the ranks that stopped answering: every process adds to a heartbeat
/// counter in the store once a second, and after a failure the counters that
/// no longer move show who is gone. A failed collective leaves the group
/// broken (later collectives throw at once): the processes no longer agree
/// on what was reduced.

// Rooms (multigpu/distributed/):
//   rendezvous.hpp     finding the master, opening the store within a time limit
//   process_group.hpp  ProcessGroup: membership, heartbeat, CPU collectives
//   communicator.hpp   the processes' vote on the facts that choose a job's backend
// The backends themselves live in their own folders (nccl/, gloo/), and the
// choice in multigpu/backend.hpp: see Note [Choosing a backend].

#include "multigpu/data_parallel.hpp"
#include "multigpu/distributed/communicator.hpp"
#include "multigpu/distributed/process_group.hpp"
#include "multigpu/distributed/rendezvous.hpp"
#include "multigpu/distributed_env.hpp"
#include "multigpu/gloo/communicator.hpp"
