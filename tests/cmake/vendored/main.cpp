// Uses each header-only dependency once (tests/cmake/check_vendored.cmake).
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include <string>

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <gloo/algorithm.h>
#include <nlohmann/json.hpp>

TEST_CASE("the vendored headers work together") {
  CLI::App app{"vendored_check"};
  int replicas = 1;
  app.add_option("--replicas", replicas);
  const char* argv[] = {"vendored_check", "--replicas", "4"};
  app.parse(3, argv);
  const nlohmann::json summary = {{"replicas", replicas}};
  CHECK(fmt::format("{} on {} devices", summary.dump(), summary["replicas"].get<int>()) ==
        "{\"replicas\":4} on 4 devices");
  CHECK(sizeof(gloo::Algorithm) > 0);
}
