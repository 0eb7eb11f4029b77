// Inputs the fuzz targets (fuzz/) flagged, each pinned here in the plain build: what UBSan saw as an int64
// overflow is, without a sanitizer, a silently wrapped product that a check then accepts.
#include <doctest/doctest.h>

#include <map>
#include <string>

#include "model/cli.h"
#include "model/config.h"
#include "model/trainer.h"

using namespace cm;

static bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

TEST_SUITE("fuzz") {
  TEST_CASE("fuzz: a stored config whose tree factors overflow int64 is rejected (the product wrapped to 16)") {
    // 16 * (2^60 + 1) wraps to 16 = num_clusters * experts_per_cluster of the defaults: accepted before the fix.
    std::map<std::string, std::string> m = {
        {"router", "tree"}, {"tree_branching", "16,1152921504606846977"}, {"tree_top_k", "1,1"}};
    try {
      CoEConfig::from_map(m);
      FAIL("accepted a tree with 2^60 + 1 children per node");
    } catch (const Error& e) {
      CHECK(contains(e.what(), "tree_branching"));
    }
    // Cluster sizes beyond 2^24 are refused before they are multiplied.
    m = {{"router", "flat"}, {"num_clusters", "4294967297"}, {"experts_per_cluster", "4294967296"}};
    CHECK_THROWS_AS(CoEConfig::from_map(m), Error);
  }

  TEST_CASE("fuzz: --tree with more than 2^24 experts is a usage error before model_config multiplies it") {
    std::string seven;
    for (int i = 0; i < 7; ++i) seven += (i ? "x" : "") + std::string("4096");
    bool help = false;
    try {
      resolve_train_args({"--device", "cpu", "--router", "tree", "--tree", seven}, &help, nullptr);
      FAIL("accepted 4096^7 experts");
    } catch (const UsageError& e) {
      CHECK(contains(e.what(), "more than 2^24 experts"));
    }
  }
}
