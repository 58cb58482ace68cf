#pragma once
// This build's compiler, flags and folders, defined in bench_config.cpp,
// which benchmarks/CMakeLists.txt generates: their absolute paths stay out of
// bench.cpp, which then compiles the same in every clone of the repository
// (scripts/configure.sh, Note [ccache across clones]).

namespace bench_config {

/// The C++ compiler of this build (the compile-time benchmark runs it).
extern const char* const kCxx;
/// The flags a consumer of multigpu::multigpu compiles with.
extern const char* const kCxxFlags;
/// Where the compile-time benchmark writes its files.
extern const char* const kScratchDir;
/// The default results folder (benchmarks/results).
extern const char* const kResultsDir;

}  // namespace bench_config
