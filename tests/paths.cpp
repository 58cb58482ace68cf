// The absolute paths that the tests need, compiled into this file only, so
// that every other test file compiles the same in every clone of the
// repository and ccache's results carry from one clone to the next
// (scripts/configure.sh, Note [ccache across clones]).

namespace multigpu_test {

const char* source_dir() { return MULTIGPU_SOURCE_DIR; }

const char* distributed_worker() { return MULTIGPU_DISTRIBUTED_WORKER; }

}  // namespace multigpu_test
