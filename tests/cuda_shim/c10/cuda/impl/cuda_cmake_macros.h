#pragma once
// Stand-in for the file that a CUDA build of LibTorch generates (a CPU-only
// LibTorch, like Debian's, ships c10/cuda headers without it). Lets the test
// suite compile multigpu's CUDA and NCCL paths, without linking, on a
// machine that has the CUDA toolkit but no CUDA LibTorch.
#define C10_CUDA_BUILD_SHARED_LIBS
