// The one doctest main of the test suite.
//
// ctest runs each test case on its own, as `multigpu_tests --test-case=NAME`
// (doctest_discover_tests). A name that does not survive that trip (CMake
// splits a name at `;`, so the filter gets only its first part) would match
// no test case, and doctest would report success without running anything.
// So a run whose --test-case filter matched nothing fails here, naming it.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <cstring>
#include <iostream>
#include <string>

namespace {

unsigned g_test_cases_run = 0;

// Records how many test cases passed the filters; reports nothing itself.
struct CountingListener : doctest::IReporter {
  explicit CountingListener(const doctest::ContextOptions&) {}
  void report_query(const doctest::QueryData&) override {}
  void test_run_start() override {}
  void test_run_end(const doctest::TestRunStats& stats) override {
    g_test_cases_run = stats.numTestCasesPassingFilters;
  }
  void test_case_start(const doctest::TestCaseData&) override {}
  void test_case_reenter(const doctest::TestCaseData&) override {}
  void test_case_end(const doctest::CurrentTestCaseStats&) override {}
  void test_case_exception(const doctest::TestCaseException&) override {}
  void subcase_start(const doctest::SubcaseSignature&) override {}
  void subcase_end() override {}
  void log_assert(const doctest::AssertData&) override {}
  void log_message(const doctest::MessageData&) override {}
  void test_case_skipped(const doctest::TestCaseData&) override {}
};
REGISTER_LISTENER("multigpu_counting", 1, CountingListener);

// The value of a --test-case / -tc filter, with or without doctest's "dt-" prefix.
const char* test_case_filter(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    for (const char* prefix : {"--test-case=", "-tc=", "--dt-test-case=", "--dt-tc="}) {
      if (std::strncmp(argv[i], prefix, std::strlen(prefix)) == 0) return argv[i] + std::strlen(prefix);
    }
  }
  return nullptr;
}

}  // namespace

int main(int argc, char** argv) {
  doctest::Context context(argc, argv);
  const int result = context.run();
  if (context.shouldExit()) return result;  // --list-test-cases, --help, ...
  const char* filter = test_case_filter(argc, argv);
  if (result == 0 && filter != nullptr && g_test_cases_run == 0) {
    std::cerr << "multigpu_tests: no test case matches --test-case=\"" << filter
              << "\". A test case's name must not contain ';' (CMake splits ctest's names there), "
                 "and must match the name in the source exactly.\n";
    return 1;
  }
  return result;
}
