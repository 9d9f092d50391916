// The sharded mode on one process (single_process communicator) and its building blocks; runs without MPI.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include <cstring>
#include <stdexcept>
#include <string>

#include "sharded_run.hpp"

using namespace specdiff;
using namespace sharded_test;

TEST_CASE("token_shard splits T tokens into contiguous shards, the first T % P one longer") {
  CHECK(token_shard::of(37, 0, 2).begin == 0);
  CHECK(token_shard::of(37, 0, 2).count == 19);
  CHECK(token_shard::of(37, 1, 2).begin == 19);
  CHECK(token_shard::of(37, 1, 2).count == 18);
  CHECK(token_shard::of(10, 2, 4).begin == 6);  // 3, 3, 2, 2
  CHECK(token_shard::of(10, 2, 4).count == 2);
  CHECK(token_shard::of(10, 3, 4).begin == 8);
  CHECK_THROWS_WITH_AS(token_shard::of(3, 0, 4), doctest::Contains("tokens: 3 tokens cannot be shared by 4 ranks"), std::invalid_argument);
  CHECK_THROWS_WITH_AS(token_shard::of(8, 2, 2), doctest::Contains("rank: 2 is out of range [0, 2)"), std::invalid_argument);
}

TEST_CASE("single_process: all_gather copies, all_reduce_sum keeps, fail rethrows the original error") {
  single_process c;
  const std::vector<float> send{1.5f, -2.f};
  std::vector<float> recv(2), counts_wrong(3);
  const std::vector<index_t> counts{2};
  c.all_gather(send, counts, recv);
  CHECK(recv == send);
  const std::vector<index_t> bad{3};
  CHECK_THROWS_WITH_AS(c.all_gather(send, bad, recv), doctest::Contains("send: expected 3"), std::invalid_argument);
  std::vector<float> v{1.f, 2.f};
  c.all_reduce_sum(v);
  CHECK(v == std::vector<float>{1.f, 2.f});
  CHECK_THROWS_AS(c.fail(std::make_exception_ptr(std::invalid_argument("x"))), std::invalid_argument);
}

TEST_CASE("single_process: all_to_all copies its one block, and other sizes are refused by name") {
  single_process c;
  const std::vector<float> send{1.5f, -2.f, 4.f};
  std::vector<float> recv(3), small(2);
  c.all_to_all(send, recv);
  CHECK(recv == send);
  CHECK_THROWS_WITH_AS(c.all_to_all(send, small), doctest::Contains("recv: expected 3"), std::invalid_argument);
  static_assert(all_to_all_communicator<single_process>);
}

TEST_CASE("single_process: all_to_all_v copies its one block (zero floats too), bad counts refused by name") {
  single_process c;
  const std::vector<float> send{1.5f, -2.f};
  std::vector<float> recv(2);
  const std::vector<index_t> two{2}, none{0}, negative{-1};
  c.all_to_all_v(send, two, recv, two);
  CHECK(recv == send);
  c.all_to_all_v({}, none, {}, none);
  CHECK_THROWS_WITH_AS(c.all_to_all_v(send, none, recv, two), doctest::Contains("send: holds 2 floats, but send_counts add up to 0"),
                       std::invalid_argument);
  CHECK_THROWS_WITH_AS(c.all_to_all_v({}, negative, {}, none), doctest::Contains("send_counts[0]: must be >= 0, got -1"),
                       std::invalid_argument);
  CHECK_THROWS_WITH_AS(c.all_to_all_v(send, two, recv, std::vector<index_t>{2, 0}), doctest::Contains("recv_counts: expected 1"),
                       std::invalid_argument);
}

TEST_CASE("global_plan on one process makes the reference's plans and rows, bit for bit") {
  for (bool cfg : {false, true}) {
    problem p;
    p.ranks = 1;
    p.share_cfg = cfg;
    p.batch = cfg ? 2 : 1;
    single_process comm;
    const record ref = run_reference(p);
    const record got = run_sharded<global_plan>(p, comm);
    REQUIRE(got.c1.size() == ref.c1.size());
    for (std::size_t k = 0; k < ref.c1.size(); ++k) {
      CHECK(got.c1[k] == ref.c1[k]);
      CHECK(std::memcmp(got.output[k].data(), ref.output[k].data(), ref.output[k].size() * sizeof(float)) == 0);
    }
  }
}

TEST_CASE("sharded refusals name the parameter, and a refused call changes nothing") {
  problem p;
  p.ranks = 1;
  single_process comm;
  using G = sharded_accelerator<specdiff_scorer, self_speculation, three_level_classifier, step_schedule, single_process>;
  accelerator_config two_plans = p.config();
  two_plans.batch = 2;  // two plans per call, not shared
  CHECK_THROWS_WITH_AS(G(comm, two_plans, {}, {}, three_level_classifier(0.5), p.schedule()),
                       doctest::Contains("batch: the global plan takes one plan per model call"), std::invalid_argument);
  const double rates[] = {0.7, 0.5};
  CHECK_THROWS_WITH_AS(G(comm, p.config(), {}, {}, three_level_classifier(rates, 0.1f), p.schedule()),
                       doctest::Contains("classifier: the global plan takes one cache rate, got 2"), std::invalid_argument);
  G acc(comm, p.config(), {}, {}, three_level_classifier(0.5), p.schedule());
  acc.begin_speculation(std::vector<float>{1000.f, 500.f});
  CHECK_THROWS_WITH_AS(acc.record_speculation(0, std::vector<float>(5, 1.f)), doctest::Contains("attention: expected 37"),
                       std::invalid_argument);
  std::vector<float> neg(37, 1.f);
  neg[3] = -1.f;
  CHECK_THROWS_WITH_AS(acc.record_speculation(0, neg), doctest::Contains("attention[3] is negative"), std::invalid_argument);
  acc.record_speculation(0, std::vector<float>(37, 1.f));  // nothing was changed by the refusals
  acc.record_speculation(1, std::vector<float>(37, 1.f));
  auto step = acc.plan_step(0, 1000.f);
  std::vector<float> rows(37 * 6, 0.5f), out(37 * 6);
  CHECK_THROWS_WITH_AS(acc.complete_step(std::move(step), matrix_view<const float>(rows.data(), 37, 6),
                                         matrix_view<float>(out.data(), 37, 6), {}),
                       doctest::Contains("attention: the scorer reads attention, got none"), std::invalid_argument);
}

TEST_CASE("global_plan, module level with a metric scorer: the same plans and rows as one process") {
  problem p;
  p.ranks = 1;
  p.share_cfg = true;
  p.batch = 2;
  single_process comm;
  int partial = 0;
  const auto same = compare_module_level(p, comm, partial);
  CHECK(same[0]);
  CHECK(same[1]);
  CHECK(partial >= 5);
}
