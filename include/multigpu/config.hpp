#pragma once
/// @file
/// Every compile-time switch of multigpu, in one place. Each one follows the
/// same rule: the user's value if defined before the first multigpu include
/// (or on the command line), else what the build detected, else the default
/// written here. The CMake target `multigpu::multigpu` defines the detected
/// ones for you.

/// Library version.
#define MULTIGPU_VERSION_MAJOR 0
/// Library version: minor.
#define MULTIGPU_VERSION_MINOR 1
/// Library version: patch.
#define MULTIGPU_VERSION_PATCH 0
/// Library version as text ("0.1.0").
#define MULTIGPU_VERSION_STRING "0.1.0"

/// 1 when LibTorch was built with CUDA and the CUDA paths (device queries
/// through the CUDA runtime, streams, CUDA guards) are compiled. CMake sets it
/// from the LibTorch it finds (`MULTIGPU_ENABLE_CUDA=AUTO|ON|OFF`). Without
/// it, multigpu runs on CPU devices only and says so loudly when GPUs exist.
#ifndef MULTIGPU_WITH_CUDA
#define MULTIGPU_WITH_CUDA 0
#endif

/// 1 when the in-process NCCL backend is compiled. Needs MULTIGPU_WITH_CUDA.
/// CMake sets it when NCCL is found (`MULTIGPU_ENABLE_NCCL=AUTO|ON|OFF`).
#ifndef MULTIGPU_WITH_NCCL
#define MULTIGPU_WITH_NCCL 0
#endif

#if MULTIGPU_WITH_NCCL && !MULTIGPU_WITH_CUDA
#error "multigpu: MULTIGPU_WITH_NCCL=1 needs MULTIGPU_WITH_CUDA=1"
#endif

/// 1 when multi-process training (multigpu/distributed.hpp) can reach other
/// processes: LibTorch's c10d with Gloo, and Gloo's headers, were found.
/// CMake sets it (`MULTIGPU_ENABLE_DISTRIBUTED=AUTO|ON|OFF`). Without it a
/// program still runs as a single process, and a launcher asking for more is
/// a clear error.
#ifndef MULTIGPU_WITH_DISTRIBUTED
#define MULTIGPU_WITH_DISTRIBUTED 0
#endif

/// 1 to look for NVML (libnvidia-ml.so.1) at run time with dlopen. NVML tells
/// the memory in use on every GPU without creating a CUDA context there, and
/// sees GPUs even when LibTorch is CPU-only. Nothing is linked: where the
/// library is absent, multigpu says so in its report and goes on. Default: on
/// Linux.
#ifndef MULTIGPU_WITH_NVML
#if defined(__linux__)
#define MULTIGPU_WITH_NVML 1
#else
#define MULTIGPU_WITH_NVML 0
#endif
#endif

/// Memory in use (MiB) above which a GPU counts as busy, that is used by
/// someone else: `auto` skips it and an explicit request for it warns.
/// Changeable at run time through DeviceManagerOptions::busy_threshold_mib.
#ifndef MULTIGPU_DEFAULT_BUSY_THRESHOLD_MIB
#define MULTIGPU_DEFAULT_BUSY_THRESHOLD_MIB 500
#endif
