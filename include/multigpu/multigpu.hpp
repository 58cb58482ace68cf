#pragma once
/// @file
/// Everything of multigpu, in dependency order. Include this one header:
///   `#include <multigpu/multigpu.hpp>`
/// Multi-process training adds <multigpu/distributed.hpp> (c10d and Gloo's
/// headers are heavy, so only programs that use them pay for them), and the
/// experiment scheduler <multigpu/scheduler.hpp> (a training program does
/// not pay for the scheduler).

#include "multigpu/config.hpp"
#include "multigpu/error.hpp"
#include "multigpu/device_spec.hpp"
#include "multigpu/runtime.hpp"
#include "multigpu/device.hpp"
#include "multigpu/batch_plan.hpp"
#include "multigpu/scatter.hpp"
#include "multigpu/replica.hpp"
#include "multigpu/streams.hpp"
#include "multigpu/worker.hpp"
#include "multigpu/comm.hpp"
#include "multigpu/backend.hpp"
#include "multigpu/comm_hook.hpp"
#include "multigpu/precision.hpp"
#include "multigpu/grad_scaler.hpp"
#include "multigpu/gradient_sync.hpp"
#include "multigpu/sync_batch_norm.hpp"
#include "multigpu/data_parallel.hpp"
#include "multigpu/checkpoint.hpp"
#include "multigpu/distributed_env.hpp"
#include "multigpu/sampler.hpp"
