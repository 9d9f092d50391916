// The sharded mode under MPI: `mpirun -n 2 specdiff_mpi_tests <case>`. Every rank checks, the failures are
// summed across ranks, and every rank exits 1 if any rank failed.
#include <mpi.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <map>
#include <random>
#include <set>
#include <string>

#include <specdiff/mpi/communicator.hpp>

#include "sharded_run.hpp"

using namespace specdiff;
using namespace sharded_test;

namespace {
int failures = 0;
int my_rank = 0;
#define EXPECT(cond)                                                                          \
  do {                                                                                        \
    if (!(cond)) {                                                                            \
      ++failures;                                                                             \
      std::fprintf(stderr, "rank %d: %s:%d: FAILED: %s\n", my_rank, __FILE__, __LINE__, #cond); \
    }                                                                                         \
  } while (0)

void rank_and_size(mpi_communicator& c) {
  EXPECT(c.size() == 2);
  const float me = static_cast<float>(c.rank());
  std::vector<float> all(2);
  const std::vector<index_t> counts{1, 1};
  c.all_gather(std::span<const float>(&me, 1), counts, all);
  EXPECT(all == (std::vector<float>{0.f, 1.f}));
}

void all_gather_variable_rows(mpi_communicator& c) {
  // rank 0: 2 values, rank 1: 3 values; then rank 0 contributes nothing.
  const std::vector<float> send = c.rank() == 0 ? std::vector<float>{1.5f, -2.f} : std::vector<float>{3.f, 4.25f, 8.f};
  std::vector<float> recv(5);
  const std::vector<index_t> counts{2, 3};
  c.all_gather(send, counts, recv);
  EXPECT(recv == (std::vector<float>{1.5f, -2.f, 3.f, 4.25f, 8.f}));
  const std::vector<float> send2 = c.rank() == 0 ? std::vector<float>{} : std::vector<float>{7.f};
  std::vector<float> recv2(1);
  const std::vector<index_t> counts2{0, 1};
  c.all_gather(send2, counts2, recv2);
  EXPECT(recv2 == std::vector<float>{7.f});
}

void all_reduce_sum(mpi_communicator& c) {
  std::vector<float> v = c.rank() == 0 ? std::vector<float>{1.f, 2.5f, -3.f, 1e-8f} : std::vector<float>{10.f, 0.25f, 3.f, 1.f};
  c.all_reduce_sum(v);
  EXPECT(v == (std::vector<float>{11.f, 2.75f, 0.f, 1e-8f + 1.f}));
  // bitwise the same on both ranks
  std::vector<float> both(8);
  const std::vector<index_t> counts{4, 4};
  c.all_gather(v, counts, both);
  EXPECT(std::memcmp(both.data(), both.data() + 4, 4 * sizeof(float)) == 0);
}

// all_to_all against hand values: rank r sends block q = {10 r + q, 100 r + q} to rank q; rank q receives block r
// from rank r. Then the head layout Ulysses uses and back: [tokens/P, heads] rows to [tokens, heads/P] and inverse.
void all_to_all(mpi_communicator& c) {
  const float r = static_cast<float>(c.rank());
  const std::vector<float> send{10 * r + 0, 100 * r + 0, 10 * r + 1, 100 * r + 1};
  std::vector<float> recv(4);
  c.all_to_all(send, recv);
  const float q = r;  // this rank receives block q of every rank
  EXPECT(recv == (std::vector<float>{0 + q, 0 + q, 10 + q, 100 + q}));
  std::vector<float> twice(4);
  c.all_to_all(recv, twice);  // an all-to-all is its own inverse with equal blocks
  EXPECT(twice == send);
  // sizes that do not split into one block per rank: refused by name before any transfer
  bool refused = false;
  try {
    std::vector<float> odd(3), out(3);
    c.all_to_all(odd, out);
  } catch (const std::invalid_argument& e) {
    refused = std::string(e.what()).find("send: 3 floats do not split into 2 equal blocks") != std::string::npos;
  }
  EXPECT(refused);
}

// all_to_all_v against hand values: rank r sends rank q the block {1000 r + 100 q + i : i < n(r, q)} of n(r, q) floats.
// Fixed counts first (a zero count each way: rank 0 sends itself nothing, rank 1 sends rank 0 nothing), then fresh
// random counts in [0, 4] drawn from a seed both ranks share (a new one per run, printed), each round checked against
// the values every rank can compute for itself. Bad counts are refused by name before any transfer.
void all_to_all_v(mpi_communicator& c) {
  const int me = c.rank(), P = c.size();
  auto value = [](int from, int to, int i) { return static_cast<float>(1000 * from + 100 * to + i); };
  auto round = [&](const std::function<int(int, int)>& n) {  // n(from, to): floats rank `from` sends rank `to`
    std::vector<float> send, recv, want;
    std::vector<index_t> send_counts, recv_counts;
    for (int q = 0; q < P; ++q) {
      send_counts.push_back(n(me, q));
      for (int i = 0; i < n(me, q); ++i) send.push_back(value(me, q, i));
    }
    for (int r = 0; r < P; ++r) {
      recv_counts.push_back(n(r, me));
      for (int i = 0; i < n(r, me); ++i) want.push_back(value(r, me, i));
    }
    recv.assign(want.size(), -1.f);
    c.all_to_all_v(send, send_counts, recv, recv_counts);
    return recv == want;
  };
  const int fixed[2][2] = {{0, 3}, {0, 2}};  // fixed[from][to]
  EXPECT(round([&](int from, int to) { return fixed[from][to]; }));
  EXPECT(round([](int, int) { return 0; }));  // nothing at all: still a collective every rank enters
  unsigned seed = static_cast<unsigned>(std::chrono::steady_clock::now().time_since_epoch().count());
  MPI_Bcast(&seed, 1, MPI_UNSIGNED, 0, c.handle());
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> count(0, 4);
  int zeros = 0;
  for (int k = 0; k < 20; ++k) {
    std::vector<int> n(static_cast<std::size_t>(P * P));
    for (auto& x : n) zeros += (x = count(rng)) == 0;
    EXPECT(round([&](int from, int to) { return n[static_cast<std::size_t>(from * P + to)]; }));
  }
  if (me == 0) std::printf("all_to_all_v: fixed counts, no counts, and 20 random rounds (seed %u, %d zero counts) match\n", seed, zeros);
  auto refused = [&](std::vector<index_t> sc, std::size_t send_size, std::vector<index_t> rc, std::size_t recv_size, const char* text) {
    std::vector<float> send(send_size), recv(recv_size);
    try {
      c.all_to_all_v(send, sc, recv, rc);
    } catch (const std::invalid_argument& e) {
      if (std::string(e.what()).find(text) != std::string::npos) return true;
      std::fprintf(stderr, "rank %d: refused with '%s', expected '%s'\n", me, e.what(), text);
    }
    return false;
  };
  EXPECT(refused({1, 1}, 3, {1, 1}, 2, "send: holds 3 floats, but send_counts add up to 2"));
  EXPECT(refused({1, -1}, 0, {0, 0}, 0, "send_counts[1]: must be >= 0, got -1"));
  EXPECT(refused({1, 1}, 2, {1}, 1, "recv_counts: expected 2"));
}

// global_plan: the same C1 sets and the same output rows as one process over a whole run (uneven shards of 37
// tokens; batch 1, and a CFG pair sharing its plan), and the same global plan on both ranks.
void global_plan_matches_one_process(mpi_communicator& c) {
  for (bool cfg : {false, true}) {
    problem p;
    p.share_cfg = cfg;
    p.batch = cfg ? 2 : 1;
    const token_shard sh = token_shard::of(p.tokens, c.rank(), c.size());
    const record ref = restrict(run_reference(p), p, sh);
    const record got = run_sharded<global_plan>(p, c);
    EXPECT(got.c1.size() == ref.c1.size());
    int partial_steps = 0;
    for (std::size_t k = 0; k < ref.c1.size() && k < got.c1.size(); ++k) {
      EXPECT(got.c1[k] == ref.c1[k]);
      EXPECT(got.output[k].size() == ref.output[k].size());
      EXPECT(std::memcmp(got.output[k].data(), ref.output[k].data(), ref.output[k].size() * sizeof(float)) == 0);
      if (static_cast<index_t>(ref.c1[k].size()) < p.batch * sh.count) ++partial_steps;
    }
    EXPECT(partial_steps >= 5);  // the run exercised partial steps, not only dense ones
  }
}

// The union of both ranks' C1 sets is the reference's global C1 set, step by step (the plan is global).
void global_plan_union_is_global(mpi_communicator& c) {
  problem p;
  const record full = run_reference(p);
  const record got = run_sharded<global_plan>(p, c);
  for (std::size_t k = 0; k < full.c1.size(); ++k) {
    const index_t n = static_cast<index_t>(got.c1[k].size());
    std::vector<index_t> counts{0, 0};
    std::vector<float> mine(got.c1[k].begin(), got.c1[k].end()), sizes{static_cast<float>(n), static_cast<float>(n)};
    std::vector<float> both_sizes(2);
    c.all_gather(std::span<const float>(sizes.data(), 1), std::vector<index_t>{1, 1}, both_sizes);
    counts = {static_cast<index_t>(both_sizes[0]), static_cast<index_t>(both_sizes[1])};
    std::vector<float> all(static_cast<std::size_t>(counts[0] + counts[1]));
    c.all_gather(mine, counts, all);
    std::vector<index_t> joined(all.begin(), all.end());
    EXPECT(joined == full.c1[k]);
  }
}

// per_shard_plan: runs with no exchange, equal |C1| per rank (38 tokens: shards of 19), and its difference from
// the global plan is reported (C1 overlap, relative L2 of the outputs against one process).
void per_shard_runs_and_reports(mpi_communicator& c) {
  problem p;
  p.tokens = 38;
  const token_shard sh = token_shard::of(p.tokens, c.rank(), c.size());
  const record ref = restrict(run_reference(p), p, sh);
  const record got = run_sharded<per_shard_plan>(p, c);
  double err2 = 0.0, norm2 = 0.0;
  int same = 0, total = 0;
  for (std::size_t k = 0; k < ref.c1.size(); ++k) {
    const index_t n = static_cast<index_t>(got.c1[k].size());
    float nf = static_cast<float>(n);
    std::vector<float> both(2);
    c.all_gather(std::span<const float>(&nf, 1), std::vector<index_t>{1, 1}, both);
    EXPECT(both[0] == both[1]);  // equal |C1| per rank
    if (k >= 2) EXPECT(n == math::compute_count(p.cache_rate, sh.count));
    const std::set<index_t> a(got.c1[k].begin(), got.c1[k].end()), b(ref.c1[k].begin(), ref.c1[k].end());
    for (index_t t : a) same += b.count(t) ? 1 : 0;
    total += static_cast<int>(std::max(a.size(), b.size()));
    for (std::size_t i = 0; i < ref.output[k].size(); ++i) {
      const double d = got.output[k][i] - ref.output[k][i];
      err2 += d * d;
      norm2 += static_cast<double>(ref.output[k][i]) * ref.output[k][i];
      EXPECT(std::isfinite(got.output[k][i]));
    }
  }
  std::vector<float> sums{static_cast<float>(err2), static_cast<float>(norm2), static_cast<float>(same), static_cast<float>(total)};
  c.all_reduce_sum(sums);
  if (c.rank() == 0)
    std::printf("per_shard_plan vs global plan (T=%d, 2 ranks, CR %.2f, %d steps): C1 overlap %.3f, output relative L2 %.4g\n",
                static_cast<int>(p.tokens), p.cache_rate, static_cast<int>(p.steps), sums[2] / sums[3], std::sqrt(sums[0] / sums[1]));
}

// Module level (fill, cache_rows, complete_step(step, attention)) with a metric scorer: set_metric's all-gather of
// uneven shards (37 tokens) for a CFG pair, the same plans and rows as one process.
void global_plan_module_level_metric(mpi_communicator& c) {
  problem p;
  p.share_cfg = true;
  p.batch = 2;
  int partial = 0;
  const auto same = compare_module_level(p, c, partial);
  EXPECT(same[0]);
  EXPECT(same[1]);
  EXPECT(partial >= 5);
}

// Reports (asserts nothing about time): the library's time per main step (plan_step + complete_step) under each policy at an SD3-medium
// 1024 x 1024 shape (T = 4096 tokens, a CFG pair sharing its plan, rows of 64 floats), and one all_reduce_sum of
// the step's batch * T attention floats alone.
void global_plan_step_cost(mpi_communicator& c) {
  problem p;
  p.tokens = 4096;
  p.batch = 2;
  p.share_cfg = true;
  p.steps = 28;
  p.dim = 64;
  auto time_run = [&](auto policy) {
    double us = 0.0;
    (void)run_sharded<decltype(policy)>(p, c, -1, &us);
    return us / static_cast<double>(p.steps);
  };
  const double per_shard = time_run(per_shard_plan{}), global = time_run(global_plan{});
  std::vector<float> v(static_cast<std::size_t>(p.batch * p.tokens), 1.f);
  const int reps = 200;
  MPI_Barrier(c.handle());
  const auto r0 = std::chrono::steady_clock::now();
  for (int i = 0; i < reps; ++i) c.all_reduce_sum(v);
  const double reduce_us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - r0).count() / reps;
  EXPECT(v[0] > 1.f);
  if (c.rank() == 0)
    std::printf("T=%d batch=%d dim=%d, 2 ranks: library time per main step %.1f us (per_shard_plan) vs %.1f us (global_plan); "
                "one all_reduce_sum of %d floats (%d bytes) %.1f us\n",
                static_cast<int>(p.tokens), static_cast<int>(p.batch), static_cast<int>(p.dim), per_shard, global, static_cast<int>(v.size()), static_cast<int>(4 * v.size()), reduce_us);
}

// Rank 1 hands over one computed row too few at step 3: every rank goes down with rank 1's message.
void bad_input_brings_every_rank_down(mpi_communicator& c) {
  problem p;
  (void)run_sharded<global_plan>(p, c, c.rank() == 1 ? 3 : -1);
  std::printf("rank %d finished normally\n", c.rank());
}
}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int code = 0;
  {
    mpi_communicator comm;
    my_rank = comm.rank();
    const std::map<std::string, std::function<void(mpi_communicator&)>> cases{
        {"rank_and_size", rank_and_size},
        {"all_gather_variable_rows", all_gather_variable_rows},
        {"all_reduce_sum", all_reduce_sum},
        {"all_to_all", all_to_all},
        {"all_to_all_v", all_to_all_v},
        {"global_plan_matches_one_process", global_plan_matches_one_process},
        {"global_plan_union_is_global", global_plan_union_is_global},
        {"per_shard_runs_and_reports", per_shard_runs_and_reports},
        {"global_plan_module_level_metric", global_plan_module_level_metric},
        {"global_plan_step_cost", global_plan_step_cost},
        {"bad_input_brings_every_rank_down", bad_input_brings_every_rank_down}};
    const auto it = argc == 2 ? cases.find(argv[1]) : cases.end();
    if (it == cases.end()) {
      if (my_rank == 0) std::fprintf(stderr, "usage: specdiff_mpi_tests <case>\n");
      code = 2;
    } else {
      try {
        it->second(comm);
      } catch (const std::exception& e) {
        std::fprintf(stderr, "rank %d: unexpected exception: %s\n", my_rank, e.what());
        ++failures;
      }
      int total = 0;
      MPI_Allreduce(&failures, &total, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
      code = total == 0 ? 0 : 1;
      if (my_rank == 0) std::printf("%s: %s\n", argv[1], code == 0 ? "passed" : "FAILED");
    }
  }
  MPI_Finalize();
  return code;
}
