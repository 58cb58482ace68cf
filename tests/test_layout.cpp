// The floor plan, enforced: what each room of include/multigpu/ may include.
// See docs/layout.md. These tests read the source tree (multigpu_test::source_dir()),
// not the compiled program.
#include "support.hpp"  // first: see its comment

#include <filesystem>
#include <fstream>
#include <map>
#include <regex>
#include <set>
#include <string>
#include <utility>
#include <vector>

namespace {

namespace fs = std::filesystem;

fs::path include_root() { return fs::path(multigpu_test::source_dir()) / "include"; }

// The multigpu headers a file includes, as "multigpu/..." paths.
std::vector<std::string> multigpu_includes(const fs::path& file) {
  static const std::regex kInclude(R"(^\s*#\s*include\s*[<"](multigpu/[^>"]+)[>"])");
  std::vector<std::string> out;
  std::ifstream in(file);
  for (std::string line; std::getline(in, line);) {
    std::smatch match;
    if (std::regex_search(line, match, kInclude)) out.push_back(match[1].str());
  }
  return out;
}

// Every header under include/multigpu/, as "multigpu/..." paths, with what it includes.
std::map<std::string, std::vector<std::string>> include_graph() {
  std::map<std::string, std::vector<std::string>> graph;
  for (const auto& entry : fs::recursive_directory_iterator(include_root() / "multigpu")) {
    if (!entry.is_regular_file() || entry.path().extension() != ".hpp") continue;
    graph[fs::relative(entry.path(), include_root()).generic_string()] = multigpu_includes(entry.path());
  }
  return graph;
}

// "multigpu/data_parallel/core.hpp" -> "data_parallel"; a header at the top -> "".
std::string folder_of(const std::string& header) {
  const std::string rest = header.substr(std::string("multigpu/").size());
  const auto slash = rest.find('/');
  return slash == std::string::npos ? "" : rest.substr(0, slash);
}

// The rules, as pure functions over a graph, so that they are tested on
// graphs that break them as well as on the real one.

// detail/ is the bottom floor: it includes only detail/ and the bottom
// vocabulary (config.hpp, error.hpp). Returns "header -> included" lines.
std::vector<std::string> detail_looking_up(const std::map<std::string, std::vector<std::string>>& graph) {
  static const std::set<std::string> kVocabulary = {"multigpu/config.hpp", "multigpu/error.hpp"};
  std::vector<std::string> out;
  for (const auto& [header, includes] : graph) {
    if (folder_of(header) != "detail") continue;
    for (const auto& included : includes) {
      if (folder_of(included) != "detail" && kVocabulary.count(included) == 0) out.push_back(header + " -> " + included);
    }
  }
  return out;
}

// Pairs of folders under include/multigpu/ that include each other.
std::vector<std::string> folders_including_each_other(const std::map<std::string, std::vector<std::string>>& graph) {
  std::set<std::pair<std::string, std::string>> edges;
  for (const auto& [header, includes] : graph) {
    for (const auto& included : includes) {
      const auto from = folder_of(header);
      const auto to = folder_of(included);
      if (!from.empty() && !to.empty() && from != to) edges.emplace(from, to);
    }
  }
  std::vector<std::string> out;
  for (const auto& [from, to] : edges) {
    if (from < to && edges.count({to, from}) != 0) out.push_back(from + "/ <-> " + to + "/");
  }
  return out;
}

std::string joined(const std::vector<std::string>& lines) {
  std::string out;
  for (const auto& line : lines) out += "\n  " + line;
  return out;
}

}  // namespace

TEST_CASE("layout: the rules catch a detail header that looks up, and folders that include each other") {
  const std::map<std::string, std::vector<std::string>> broken = {
      {"multigpu/detail/a.hpp", {"multigpu/detail/b.hpp", "multigpu/error.hpp", "multigpu/comm.hpp"}},
      {"multigpu/detail/b.hpp", {"multigpu/config.hpp"}},
      {"multigpu/x/one.hpp", {"multigpu/y/two.hpp", "multigpu/detail/b.hpp"}},
      {"multigpu/y/two.hpp", {"multigpu/x/three.hpp"}},
      {"multigpu/comm.hpp", {"multigpu/x/one.hpp"}},
  };
  CHECK(detail_looking_up(broken) == std::vector<std::string>{"multigpu/detail/a.hpp -> multigpu/comm.hpp"});
  CHECK(folders_including_each_other(broken) == std::vector<std::string>{"x/ <-> y/"});
}

TEST_CASE("layout: detail/ includes only detail/, config.hpp and error.hpp") {
  const auto graph = include_graph();
  REQUIRE(graph.count("multigpu/detail/compat.hpp") == 1);  // the walk found the headers
  const auto wrong = detail_looking_up(graph);
  CHECK_MESSAGE(wrong.empty(), "detail/ is the bottom floor; these includes look up:" << joined(wrong));
}

TEST_CASE("layout: no two folders of include/multigpu/ include each other") {
  const auto wrong = folders_including_each_other(include_graph());
  CHECK_MESSAGE(wrong.empty(), "folders that include each other:" << joined(wrong));
}

TEST_CASE("layout: every multigpu header a header includes exists") {
  std::vector<std::string> missing;
  for (const auto& [header, includes] : include_graph()) {
    for (const auto& included : includes) {
      if (!fs::exists(include_root() / included)) missing.push_back(header + " -> " + included);
    }
  }
  CHECK_MESSAGE(missing.empty(), "includes of headers that do not exist:" << joined(missing));
}

TEST_CASE("layout: the tools use only the public API (no detail:: name in tools/)") {
  static const std::regex kDetail(R"(\bdetail::)");
  std::vector<std::string> found;
  for (const auto& entry : fs::directory_iterator(fs::path(multigpu_test::source_dir()) / "tools")) {
    std::ifstream in(entry.path());
    int number = 0;
    for (std::string line; std::getline(in, line);) {
      ++number;
      if (std::regex_search(line, kDetail)) found.push_back(entry.path().filename().string() + ":" + std::to_string(number));
    }
  }
  CHECK_MESSAGE(found.empty(), "tools/ uses detail:: names; give them a public API instead:" << joined(found));
}

TEST_CASE("layout: no test case name holds a semicolon (CMake splits ctest's test names there, so ctest would run none)") {
  static const std::regex kName(R"((TEST_CASE)\s*\(\s*"([^"]*)\")");
  std::vector<std::string> found;
  for (const auto& entry : fs::recursive_directory_iterator(fs::path(multigpu_test::source_dir()) / "tests")) {
    if (!entry.is_regular_file() || entry.path().extension() != ".cpp") continue;
    std::ifstream in(entry.path());
    int number = 0;
    for (std::string line; std::getline(in, line);) {
      ++number;
      std::smatch match;
      if (std::regex_search(line, match, kName) && match[2].str().find(';') != std::string::npos) {
        found.push_back(entry.path().filename().string() + ":" + std::to_string(number) + " \"" + match[2].str() + "\"");
      }
    }
  }
  CHECK_MESSAGE(found.empty(), "test names with ';':" << joined(found));
}
