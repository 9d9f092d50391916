// The reference engine, sequence-parallel by K/V exchange on two MPI ranks (docs/scale-out.md): rank r runs a
// token-subset forward over its token shard, and forward_options::kv_exchange all-gathers every layer's fresh
// keys and values before a query reads them. Checked against one process's full forward: the shard's output
// rows and the attention probe (the ranks' partial column sums, summed) within 1e-5 relative L2, for SD3
// (with MMDiT-X's image-only attention) and FLUX. `mpirun -n 2 specdiff_engine_sp_tests <case>`.
#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <numeric>
#include <random>
#include <optional>
#include <cstdio>
#include <stdexcept>
#include <string>

#include <specdiff/mpi/communicator.hpp>
#include <specdiff/sharded.hpp>
#include <specdiff/specdiff.hpp>

#include "sd3/sequence_parallel.hpp"

#include "engine_fixture.hpp"

namespace {
int failures = 0;

double relative_l2(std::span<const float> got, std::span<const float> want) {
  double e = 0.0, n = 0.0;
  for (std::size_t i = 0; i < want.size(); ++i) {
    const double d = static_cast<double>(got[i]) - want[i];
    e += d * d;
    n += static_cast<double>(want[i]) * want[i];
  }
  return std::sqrt(e / n);
}

void expect(bool ok, const std::string& what, int rank) {
  if (!ok) {
    ++failures;
    std::fprintf(stderr, "rank %d: FAILED: %s\n", rank, what.c_str());
  }
}

// One forward split over the ranks against the full forward. `rows_of_full` turns the full forward's velocity into
// [batch, N, P] token rows (SD3 returns the image, FLUX the rows).
template <class RowsOf>
void compare(specdiff::mpi_communicator& comm, sd3::transformer& net, const sd3::forward_inputs& in, int N, const char* name,
             RowsOf rows_of_full) {
  const int B = in.batch, P = net.patch_features(), D = net.hidden();
  const specdiff::token_shard sh = specdiff::token_shard::of(N, comm.rank(), comm.size());
  // the reference: one process, every token
  std::vector<float> velocity(static_cast<std::size_t>(B) * N * P), full_rows(velocity.size()),
      full_probe(static_cast<std::size_t>(B) * N);
  sd3::forward_options all;
  all.attention_probe = full_probe;
  net.forward(in, velocity, all);
  rows_of_full(velocity, full_rows);
  // this rank's shard, with the K/V exchange
  std::vector<std::int32_t> ids;
  for (int b = 0; b < B; ++b)
    for (int t = 0; t < sh.count; ++t) ids.push_back(static_cast<std::int32_t>(sh.begin + t));
  std::vector<float> rows(static_cast<std::size_t>(B) * sh.count * P), probe(static_cast<std::size_t>(B) * N);
  sd3::kv_cache kv(net, B, N);
  std::vector<specdiff::index_t> counts;
  for (int r = 0; r < comm.size(); ++r) counts.push_back(specdiff::token_shard::of(N, r, comm.size()).count * D);
  std::vector<float> send(static_cast<std::size_t>(sh.count) * D);
  int exchanges = 0;
  sd3::forward_options mine;
  mine.image_tokens = ids;
  mine.kv = &kv;
  mine.attention_probe = probe;
  mine.kv_exchange = [&](int layer, sd3::attention_kind kind, sd3::kv_cache& cache) {
    ++exchanges;
    for (int b = 0; b < B; ++b)
      for (float* rows_of : {cache.keys(layer, b, kind), cache.values(layer, b, kind)}) {
        std::copy_n(rows_of + static_cast<std::size_t>(sh.begin) * D, send.size(), send.begin());
        comm.all_gather(send, counts, std::span<float>(rows_of, static_cast<std::size_t>(N) * D));
      }
  };
  net.forward(in, rows, mine);
  comm.all_reduce_sum(probe);
  std::vector<float> want;
  for (int b = 0; b < B; ++b)
    want.insert(want.end(), full_rows.begin() + (static_cast<std::ptrdiff_t>(b) * N + sh.begin) * P,
                full_rows.begin() + (static_cast<std::ptrdiff_t>(b) * N + sh.begin + sh.count) * P);
  const double rows_err = relative_l2(rows, want), probe_err = relative_l2(probe, full_probe);
  expect(rows_err <= 1e-5, std::string(name) + ": rows relative L2 " + std::to_string(rows_err), comm.rank());
  expect(probe_err <= 1e-5, std::string(name) + ": probe relative L2 " + std::to_string(probe_err), comm.rank());
  expect(exchanges >= net.blocks(), std::string(name) + ": " + std::to_string(exchanges) + " exchanges", comm.rank());
  std::printf("rank %d %s: tokens [%d, %d) of %d, %d K/V exchanges, rows relative L2 %.3g, probe relative L2 %.3g\n",
              comm.rank(), name, static_cast<int>(sh.begin), static_cast<int>(sh.begin + sh.count), N, exchanges, rows_err,
              probe_err);
}

void sd3_forward(specdiff::mpi_communicator& comm) {
  test_util::random_problem p(11, true, {0, 1});  // MMDiT-X: blocks 0 and 1 have the image-only attention
  sd3::transformer net(p.model, p.limits(), 1);
  // refused by name: an exchange needs a cache
  sd3::forward_options bad;
  bad.kv_exchange = [](int, sd3::attention_kind, sd3::kv_cache&) {};
  std::vector<float> v(p.velocity_size());
  bool refused = false;
  try {
    net.forward(p.inputs(), v, bad);
  } catch (const std::invalid_argument& e) {
    refused = std::string(e.what()).find("kv_exchange needs a kv_cache") != std::string::npos;
  }
  expect(refused, "kv_exchange without kv refused by name", comm.rank());
  compare(comm, net, p.inputs(), p.tokens(), "sd3 (MMDiT-X)", [&](std::span<const float> vel, std::span<float> rows) {
    net.velocity_to_rows(p.batch, p.height, p.width, vel, rows);
  });
}

void flux_forward(specdiff::mpi_communicator& comm) {
  const auto model = sd3::flux_model::random(test_util::small_flux_config(), 5);
  constexpr int batch = 2, rows = 4, cols = 5, context_tokens = 3, N = rows * cols;
  std::mt19937 rng(5);
  std::normal_distribution<float> n;
  auto draw = [&](std::size_t count) {
    std::vector<float> v(count);
    for (auto& x : v) x = n(rng);
    return v;
  };
  const auto latents = draw(batch * N * 8), context = draw(batch * context_tokens * 12), pooled = draw(batch * 10);
  const std::vector<float> timesteps{700.f, 250.f}, guidance{3.5f, 1.f};
  const sd3::forward_inputs in{.batch = batch, .height = rows, .width = cols, .context_tokens = context_tokens, .latents = latents,
                               .timesteps = timesteps, .context = context, .pooled = pooled, .guidance = guidance};
  sd3::transformer net(model, {.max_batch = batch, .max_height = rows, .max_width = cols, .max_context_tokens = 4}, 1);
  compare(comm, net, in, N, "flux", [](std::span<const float> vel, std::span<float> out) { std::copy(vel.begin(), vel.end(), out.begin()); });
}

// Ulysses (forward_options::ulysses): rank r runs its contiguous shard with the q|k|v rows exchanged over heads by
// the communicator's all_to_all, against one process's full forward: the shard's rows and the probe (the ranks'
// partial sums over their heads, summed) within 1e-5 relative L2. Also one rank alone (single_process, P = 1)
// against the plain forward, where nothing is split: equal within 1e-6.
template <class RowsOf>
void compare_ulysses(specdiff::mpi_communicator& comm, sd3::transformer& net, const sd3::forward_inputs& in, int N,
                     bool context_queries, const char* name, RowsOf rows_of_full) {
  const int B = in.batch, P = net.patch_features(), ranks = comm.size(), per = N / ranks, begin = comm.rank() * per;
  std::vector<float> velocity(static_cast<std::size_t>(B) * N * P), full_rows(velocity.size()),
      full_probe(static_cast<std::size_t>(B) * N);
  sd3::forward_options all;
  all.attention_probe = full_probe;
  all.probe_context_queries = context_queries;
  net.forward(in, velocity, all);
  rows_of_full(velocity, full_rows);
  std::vector<std::int32_t> ids;
  for (int b = 0; b < B; ++b)
    for (int t = 0; t < per; ++t) ids.push_back(static_cast<std::int32_t>(begin + t));
  std::vector<float> rows(static_cast<std::size_t>(B) * per * P), probe(static_cast<std::size_t>(B) * N);
  int exchanges = 0;
  sd3::forward_options mine;
  mine.image_tokens = ids;
  mine.attention_probe = probe;
  mine.probe_context_queries = context_queries;
  mine.ulysses = {comm.rank(), ranks, [&](std::span<const float> send, std::span<float> recv) {
                    ++exchanges;
                    comm.all_to_all(send, recv);
                  }};
  net.forward(in, rows, mine);
  comm.all_reduce_sum(probe);
  std::vector<float> want;
  for (int b = 0; b < B; ++b)
    want.insert(want.end(), full_rows.begin() + (static_cast<std::ptrdiff_t>(b) * N + begin) * P,
                full_rows.begin() + (static_cast<std::ptrdiff_t>(b) * N + begin + per) * P);
  const double rows_err = relative_l2(rows, want), probe_err = relative_l2(probe, full_probe);
  expect(rows_err <= 1e-5, std::string(name) + ": Ulysses rows relative L2 " + std::to_string(rows_err), comm.rank());
  expect(probe_err <= 1e-5, std::string(name) + ": Ulysses probe relative L2 " + std::to_string(probe_err), comm.rank());
  expect(exchanges >= 2 * net.blocks(), std::string(name) + ": " + std::to_string(exchanges) + " all-to-alls", comm.rank());
  // P = 1: the same path with nothing to split
  specdiff::single_process one;
  std::vector<float> one_rows(velocity.size()), one_probe(full_probe.size());
  sd3::forward_options alone;
  alone.attention_probe = one_probe;
  alone.probe_context_queries = context_queries;
  alone.ulysses = {0, 1, [&](std::span<const float> send, std::span<float> recv) { one.all_to_all(send, recv); }};
  net.forward(in, one_rows, alone);
  std::vector<float> one_full(velocity.size());
  rows_of_full(one_rows, one_full);
  const double one_err = relative_l2(one_full, full_rows), one_probe_err = relative_l2(one_probe, full_probe);
  expect(one_err <= 1e-6 && one_probe_err <= 1e-6,
         std::string(name) + ": Ulysses P = 1 relative L2 " + std::to_string(one_err) + " / probe " + std::to_string(one_probe_err), comm.rank());
  std::printf("rank %d %s Ulysses: tokens [%d, %d) of %d, heads %d/%d, %d all-to-alls, rows relative L2 %.3g, probe (%s queries) "
              "relative L2 %.3g; P = 1: %.3g / %.3g\n",
              comm.rank(), name, begin, begin + per, N, net.arch() == sd3::architecture::sd3 ? net.config().num_attention_heads / ranks
                                                                                                 : net.flux().num_attention_heads / ranks,
              net.arch() == sd3::architecture::sd3 ? net.config().num_attention_heads : net.flux().num_attention_heads, exchanges,
              rows_err, context_queries ? "image and context" : "image", probe_err, one_err, one_probe_err);
}

void sd3_ulysses(specdiff::mpi_communicator& comm) {
  test_util::random_problem p(11, true, {0, 1});  // MMDiT-X: the image-only attention exchanges heads too
  sd3::transformer net(p.model, p.limits(), 1);
  compare_ulysses(comm, net, p.inputs(), p.tokens(), false, "sd3 (MMDiT-X)", [&](std::span<const float> vel, std::span<float> rows) {
    net.velocity_to_rows(p.batch, p.height, p.width, vel, rows);
  });
}

struct flux_problem {
  sd3::flux_model model;
  int batch = 2, rows, cols, context_tokens = 3;
  std::vector<float> latents, context, pooled, timesteps{700.f, 250.f}, guidance{3.5f, 1.f};
  flux_problem(const sd3::flux_config& c, int rows_, int cols_) : model(sd3::flux_model::random(c, 5)), rows(rows_), cols(cols_) {
    std::mt19937 rng(5);
    std::normal_distribution<float> n;
    auto draw = [&](std::size_t count) {
      std::vector<float> v(count);
      for (auto& x : v) x = n(rng);
      return v;
    };
    latents = draw(static_cast<std::size_t>(batch) * rows * cols * c.in_channels);
    context = draw(static_cast<std::size_t>(batch) * context_tokens * c.joint_attention_dim);
    pooled = draw(static_cast<std::size_t>(batch) * c.pooled_projection_dim);
  }
  sd3::forward_inputs inputs() const {
    return {.batch = batch, .height = rows, .width = cols, .context_tokens = context_tokens, .latents = latents,
            .timesteps = timesteps, .context = context, .pooled = pooled, .guidance = guidance};
  }
  sd3::engine_limits limits() const { return {.max_batch = batch, .max_height = rows, .max_width = cols, .max_context_tokens = 4}; }
};

void flux_ulysses(specdiff::mpi_communicator& comm) {
  const flux_problem p(test_util::small_flux_config(), 4, 5);  // rotary positions applied per token before the exchange
  sd3::transformer net(p.model, p.limits(), 1);
  compare_ulysses(comm, net, p.inputs(), p.rows * p.cols, true, "flux", [](std::span<const float> vel, std::span<float> out) {
    std::copy(vel.begin(), vel.end(), out.begin());
  });
}

// Ulysses token-subset forwards (SpecDiff's partial forward under forward_options::ulysses with rank_tokens), against
// one process: a full forward at t = 700 fills the caches (one process: every head; each rank: its heads, kv_cache
// with head_ranks = 2), then token-subset forwards at later timesteps, each on the K/V the earlier ones left (so
// the caches must be written at the computed tokens before attention reads the rest). Each step's token set is given
// per sample as every rank's share (the global plan's: the C1 tokens inside the rank's shard), with the same count
// per rank in every sample; one process runs the union. Checked per step: this rank's rows and the summed probe
// within 1e-5 relative L2 of one process's. Steps: a fixed set, one where rank 1's share is empty (it runs a forward of
// zero image tokens, image_selection::none), one where rank 0's is, and fresh random sets (seed printed).
template <class Inputs>
void compare_ulysses_subset(specdiff::mpi_communicator& comm, sd3::transformer& net, Inputs inputs_at, int B, int N,
                            bool context_queries, const char* name) {
  const int P = net.patch_features(), ranks = comm.size(), me = comm.rank();
  const auto shard = [&](int r) { return specdiff::token_shard::of(N, r, ranks); };
  unsigned seed = static_cast<unsigned>(std::chrono::steady_clock::now().time_since_epoch().count());
  MPI_Bcast(&seed, 1, MPI_UNSIGNED, 0, comm.handle());
  std::mt19937 rng(seed);
  // a step: counts[r] tokens of rank r's shard per sample; picks[b][r] their offsets in the shard
  struct step_set {
    float t;
    std::vector<std::vector<std::vector<int>>> picks;  // [sample][rank] ascending shard offsets
  };
  auto first_of = [&](std::vector<int> counts, bool same_for_samples) {
    std::vector<std::vector<std::vector<int>>> picks(static_cast<std::size_t>(B), std::vector<std::vector<int>>(static_cast<std::size_t>(ranks)));
    for (int b = 0; b < B; ++b)
      for (int r = 0; r < ranks; ++r) {
        std::vector<int> all(static_cast<std::size_t>(shard(r).count));
        std::iota(all.begin(), all.end(), 0);
        if (!same_for_samples || b == 0) std::shuffle(all.begin(), all.end(), rng);
        else all = picks[0][static_cast<std::size_t>(r)];
        all.resize(static_cast<std::size_t>(counts[static_cast<std::size_t>(r)]));
        std::sort(all.begin(), all.end());
        picks[static_cast<std::size_t>(b)][static_cast<std::size_t>(r)] = all;
      }
    return picks;
  };
  std::vector<step_set> steps;
  {  // fixed: tokens 1, 2 and 5 of shard 0 and 0, 4 of shard 1, the same in both samples
    std::vector<std::vector<std::vector<int>>> fixed(static_cast<std::size_t>(B), {{1, 2, 5}, {0, 4}});
    steps.push_back({500.f, fixed});
  }
  steps.push_back({400.f, first_of({4, 0}, false)});  // rank 1's share empty
  steps.push_back({300.f, first_of({0, 3}, false)});  // rank 0's share empty
  std::uniform_int_distribution<int> count0(0, shard(0).count), count1(0, shard(1).count);
  for (int k = 0; k < 3; ++k) {
    int c0 = count0(rng), c1 = count1(rng);
    if (c0 + c1 == 0) c1 = 1;
    steps.push_back({250.f - 50.f * k, first_of({c0, c1}, k == 1)});
  }

  // one process: every head, the union of the ranks' sets
  sd3::kv_cache kv(net, B, N);
  std::vector<float> velocity(static_cast<std::size_t>(B) * N * P), full_probe(static_cast<std::size_t>(B) * N);
  sd3::forward_options all;
  all.kv = &kv;
  all.attention_probe = full_probe;
  all.probe_context_queries = context_queries;
  net.forward(inputs_at(700.f), velocity, all);
  // two ranks: a Ulysses full forward fills the caches of the rank's heads
  sd3::kv_cache mine_kv(net, B, N, ranks);
  const auto sh = shard(me);
  std::vector<std::int32_t> shard_ids;
  for (int b = 0; b < B; ++b)
    for (int t = 0; t < sh.count; ++t) shard_ids.push_back(static_cast<std::int32_t>(sh.begin + t));
  std::vector<float> shard_rows(static_cast<std::size_t>(B) * sh.count * P), probe(full_probe.size());
  const auto a2a = [&](std::span<const float> send, std::span<float> recv) { comm.all_to_all(send, recv); };
  const auto a2av = [&](std::span<const float> send, std::span<const std::int32_t> sc, std::span<float> recv, std::span<const std::int32_t> rc) {
    comm.all_to_all_v(send, sc, recv, rc);
  };
  sd3::forward_options full;
  full.image_tokens = shard_ids;
  full.kv = &mine_kv;
  full.attention_probe = probe;
  full.probe_context_queries = context_queries;
  full.ulysses = {me, ranks, a2a};
  net.forward(inputs_at(700.f), shard_rows, full);

  int k = 0, empty_steps = 0;
  double worst_rows = 0, worst_probe = 0;
  for (const auto& st : steps) {
    std::vector<std::vector<std::int32_t>> lists(static_cast<std::size_t>(ranks));
    std::vector<std::int32_t> unions;
    for (int b = 0; b < B; ++b)
      for (int r = 0; r < ranks; ++r)
        for (const int o : st.picks[static_cast<std::size_t>(b)][static_cast<std::size_t>(r)]) {
          lists[static_cast<std::size_t>(r)].push_back(static_cast<std::int32_t>(shard(r).begin + o));
          unions.push_back(static_cast<std::int32_t>(shard(r).begin + o));
        }
    const int n = static_cast<int>(unions.size()) / B;
    std::vector<float> ref_rows(static_cast<std::size_t>(B) * n * P), ref_probe(full_probe.size());
    sd3::forward_options one;
    one.image_tokens = unions;
    one.kv = &kv;
    one.attention_probe = ref_probe;
    one.probe_context_queries = context_queries;
    net.forward(inputs_at(st.t), ref_rows, one);

    const auto& own = lists[static_cast<std::size_t>(me)];
    const int m = static_cast<int>(own.size()) / B;
    std::vector<std::span<const std::int32_t>> spans(lists.begin(), lists.end());
    std::vector<float> rows(static_cast<std::size_t>(B) * m * P);
    int exchanges = 0;
    sd3::forward_options o;
    o.image_tokens = own;
    o.select = own.empty() ? sd3::image_selection::none : sd3::image_selection::listed;
    o.kv = &mine_kv;
    o.attention_probe = probe;
    o.probe_context_queries = context_queries;
    o.ulysses = {me, ranks, a2a, spans, [&](std::span<const float> send, std::span<const std::int32_t> sc, std::span<float> recv,
                                            std::span<const std::int32_t> rc) {
                   ++exchanges;
                   a2av(send, sc, recv, rc);
                 }};
    net.forward(inputs_at(st.t), rows, o);
    comm.all_reduce_sum(probe);
    // this rank's rows of one process's: its share sits after the earlier ranks' in every sample
    int before = 0;
    for (int r = 0; r < me; ++r) before += static_cast<int>(lists[static_cast<std::size_t>(r)].size()) / B;
    std::vector<float> want;
    for (int b = 0; b < B; ++b)
      want.insert(want.end(), ref_rows.begin() + (static_cast<std::ptrdiff_t>(b) * n + before) * P,
                  ref_rows.begin() + (static_cast<std::ptrdiff_t>(b) * n + before + m) * P);
    const double rows_err = m == 0 ? 0.0 : relative_l2(rows, want), probe_err = relative_l2(probe, ref_probe);
    bool empty = false;
    for (const auto& l : lists) empty = empty || l.empty();
    empty_steps += empty;
    worst_rows = std::max(worst_rows, rows_err);
    worst_probe = std::max(worst_probe, probe_err);
    const std::string at = std::string(name) + " Ulysses subset step " + std::to_string(k) + " (" + std::to_string(lists[0].size() / B) + " + " +
                           std::to_string(lists[1].size() / B) + " tokens per sample)";
    expect(rows_err <= 1e-5, at + ": rows relative L2 " + std::to_string(rows_err), me);
    expect(probe_err <= 1e-5, at + ": probe relative L2 " + std::to_string(probe_err), me);
    expect(exchanges >= 2 * net.blocks(), at + ": " + std::to_string(exchanges) + " all-to-alls with counts (every rank joins them)", me);
    ++k;
  }
  expect(empty_steps >= 2, std::string(name) + ": steps with an empty share " + std::to_string(empty_steps), me);
  std::printf("rank %d %s Ulysses subset: %d steps (%d with an empty share; random sets, seed %u): worst rows relative L2 %.3g, "
              "worst summed probe relative L2 %.3g\n",
              me, name, k, empty_steps, seed, worst_rows, worst_probe);
}

// The problem's inputs with every sample at timestep t (`timesteps`: the caller's buffer, one per sample).
template <class Problem>
auto inputs_at_timestep(Problem& p, std::vector<float>& timesteps) {
  return [&p, &timesteps](float t) {
    std::fill(timesteps.begin(), timesteps.end(), t);
    sd3::forward_inputs in = p.inputs();
    in.timesteps = timesteps;
    return in;
  };
}

void sd3_ulysses_subset(specdiff::mpi_communicator& comm) {
  test_util::random_problem p(11, true, {0, 1});  // MMDiT-X: the image-only attention's cache slots too
  sd3::transformer net(p.model, p.limits(), 1);
  std::vector<float> timesteps(static_cast<std::size_t>(p.batch));
  compare_ulysses_subset(comm, net, inputs_at_timestep(p, timesteps), p.batch, p.tokens(), false, "sd3 (MMDiT-X)");
}

void flux_ulysses_subset(specdiff::mpi_communicator& comm) {
  const flux_problem p(test_util::small_flux_config(), 4, 5);  // rotary positions, single-stream blocks, probe with context queries
  sd3::transformer net(p.model, p.limits(), 1);
  std::vector<float> timesteps(static_cast<std::size_t>(p.batch));
  compare_ulysses_subset(comm, net, inputs_at_timestep(p, timesteps), p.batch, p.rows * p.cols, true, "flux");
}

// sd3::sequence_parallel with use_ulysses(true): forward_full against one process's forward (velocity on every rank,
// the probe summed over the ranks), both within 1e-5 relative L2. Prints the two errors after `what`.
template <class Inputs>
void check_ulysses_forward_full(specdiff::mpi_communicator& comm, sd3::transformer& net, const Inputs& inputs, int batch, int tokens,
                                const std::string& what) {
  sd3::sequence_parallel<specdiff::mpi_communicator> sp(comm, net, batch, tokens);
  sp.use_ulysses(true);
  const auto rows = static_cast<std::size_t>(batch) * static_cast<std::size_t>(tokens);
  std::vector<float> want(rows * static_cast<std::size_t>(net.patch_features())), got(want.size()), want_probe(rows), probe(rows);
  sd3::forward_options all;
  all.attention_probe = want_probe;
  net.forward(inputs, want, all);
  sp.forward_full(inputs, got, probe);
  comm.all_reduce_sum(probe);
  const double err = relative_l2(got, want), probe_err = relative_l2(probe, want_probe);
  expect(err <= 1e-5, what + ": forward_full relative L2 " + std::to_string(err), comm.rank());
  expect(probe_err <= 1e-5, what + ": probe relative L2 " + std::to_string(probe_err), comm.rank());
  std::printf("rank %d %s (shard of %d): forward_full velocity relative L2 %.3g, probe %.3g\n", comm.rank(), what.c_str(),
              static_cast<int>(sp.shard().count), err, probe_err);
}

// What the demo's --sequence-parallel --ulysses runs for full RFlow. (Its forward_sample: the Ulysses SpecDiff runs
// below; full RFlow over ranks: mpi/demo_sd3_ulysses.)
void sd3_ulysses_sampler(specdiff::mpi_communicator& comm) {
  test_util::random_problem p(13, true, {1});
  sd3::transformer net(p.model, p.limits(), 1);
  check_ulysses_forward_full(comm, net, p.inputs(), p.batch, p.tokens(), "sampler Ulysses");
}

// Uneven shards under Ulysses (T % P != 0: 15 tokens on 2 ranks, shards of 8 and 7): the sampler's forwards give every
// rank's shard in ulysses.rank_tokens, exchanged with per-rank counts (FLUX).
void flux_ulysses_uneven(specdiff::mpi_communicator& comm) {
  const flux_problem p(test_util::small_flux_config(), 3, 5);
  sd3::transformer net(p.model, p.limits(), 1);
  check_ulysses_forward_full(comm, net, p.inputs(), p.batch, p.rows * p.cols,
                             "FLUX Ulysses, " + std::to_string(p.rows * p.cols) + " tokens on " + std::to_string(comm.size()) + " ranks");
}

// Refused by name on every rank, before any exchange (so no rank waits for another): heads % ranks != 0, tokens %
// ranks != 0, a token subset within the shard, a K/V cache alongside.
void ulysses_refused(specdiff::mpi_communicator& comm) {
  const int ranks = comm.size();
  auto refused = [&](sd3::transformer& net, const sd3::forward_inputs& in, std::vector<std::int32_t> ids, sd3::kv_cache* kv,
                     const std::string& text) {
    std::vector<float> rows(ids.size() * static_cast<std::size_t>(net.patch_features()));
    sd3::forward_options o;
    o.image_tokens = ids;
    o.kv = kv;
    o.ulysses = {comm.rank(), ranks, [&](std::span<const float> send, std::span<float> recv) { comm.all_to_all(send, recv); }};
    bool ok = false;
    std::string what = "(nothing thrown)";
    try {
      net.forward(in, rows, o);
    } catch (const std::invalid_argument& e) {
      what = e.what();
      ok = what.find(text) != std::string::npos;
    }
    expect(ok, "refused by name: expected '" + text + "', got: " + what, comm.rank());
    std::printf("rank %d refused: %s\n", comm.rank(), what.c_str());
  };
  auto shard = [&](int batch, int N, int count) {
    std::vector<std::int32_t> ids;
    const int begin = comm.rank() * (N / ranks);
    for (int b = 0; b < batch; ++b)
      for (int t = 0; t < count; ++t) ids.push_back(static_cast<std::int32_t>(begin + t));
    return ids;
  };
  auto three_heads = test_util::small_flux_config();
  three_heads.num_attention_heads = 3;
  const flux_problem odd_heads(three_heads, 4, 5);
  sd3::transformer net3(odd_heads.model, odd_heads.limits(), 1);
  refused(net3, odd_heads.inputs(), shard(2, 20, 20 / ranks), nullptr,
          "ulysses: heads = 3 do not split over ranks = " + std::to_string(ranks));
  const flux_problem odd_tokens(test_util::small_flux_config(), 3, 5);
  sd3::transformer net(odd_tokens.model, odd_tokens.limits(), 1);
  refused(net, odd_tokens.inputs(), shard(2, 15, 15 / ranks), nullptr,
          "ulysses: image tokens = 15 do not split over ranks = " + std::to_string(ranks));
  const flux_problem ok(test_util::small_flux_config(), 4, 5);
  sd3::transformer net2(ok.model, ok.limits(), 1);
  refused(net2, ok.inputs(), shard(2, 20, 20 / ranks - 1), nullptr, "a token subset under ulysses needs ulysses.rank_tokens");
  sd3::kv_cache kv(net2, 2, 20);  // every head: not a Ulysses rank's cache
  refused(net2, ok.inputs(), shard(2, 20, 20 / ranks), &kv, "(ulysses: the rank's heads, kv_cache(net, batch, tokens, ranks = ");
  // token subsets (ulysses.rank_tokens): every rank's list, this rank's the call's, disjoint, a cache of the rank's heads
  sd3::kv_cache heads_kv(net2, 2, 20, ranks);
  auto subset = [&](std::vector<std::vector<std::int32_t>> lists, std::vector<std::int32_t> ids, sd3::image_selection select, sd3::kv_cache* cache,
                    const std::string& text) {
    std::vector<std::span<const std::int32_t>> spans(lists.begin(), lists.end());
    // every token's rows where the call asks for every token (ids empty, listed)
    std::vector<float> rows((ids.empty() && select == sd3::image_selection::listed ? 2 * 20 : ids.size()) * static_cast<std::size_t>(net2.patch_features()));
    sd3::forward_options o;
    o.image_tokens = ids;
    o.select = select;
    o.kv = cache;
    o.ulysses = {comm.rank(), ranks, [&](std::span<const float> send, std::span<float> recv) { comm.all_to_all(send, recv); }, spans,
                 [&](std::span<const float> send, std::span<const std::int32_t> sc, std::span<float> recv, std::span<const std::int32_t> rc) {
                   comm.all_to_all_v(send, sc, recv, rc);
                 }};
    bool good = false;
    std::string what = "(nothing thrown)";
    try {
      net2.forward(ok.inputs(), rows, o);
    } catch (const std::invalid_argument& e) {
      what = e.what();
      good = what.find(text) != std::string::npos;
    }
    expect(good, "refused by name: expected '" + text + "', got: " + what, comm.rank());
    std::printf("rank %d refused: %s\n", comm.rank(), what.c_str());
  };
  const auto listed = sd3::image_selection::listed, none = sd3::image_selection::none;
  const std::vector<std::vector<std::int32_t>> two_each{{1, 3, 1, 3}, {12, 15, 12, 15}};  // 2 tokens per sample on each rank
  const auto& own = two_each[static_cast<std::size_t>(comm.rank())];
  subset(two_each, own, listed, nullptr, "reads the other tokens' keys and values from a kv_cache of the rank's heads (options.kv is null)");
  subset({{1, 3, 1, 3}, {3, 15, 3, 15}}, comm.rank() == 0 ? std::vector<std::int32_t>{1, 3, 1, 3} : std::vector<std::int32_t>{3, 15, 3, 15}, listed,
         &heads_kv, "ulysses.rank_tokens: token 3 of sample 0 is in two ranks' lists");
  subset(two_each, {own[0], own[0]}, listed, &heads_kv, "differ from ulysses.rank_tokens[" + std::to_string(comm.rank()) + "]");
  subset({{1, 3, 1, 3}}, own, listed, &heads_kv, "ulysses.rank_tokens has 1 lists, expected one per rank");
  subset(two_each, {}, none, &heads_kv, "select = image_selection::none, but ulysses.rank_tokens[" + std::to_string(comm.rank()) + "] (this rank's) holds 4 ids");
  // rank 1's list descends: rank 0 finds it in rank_tokens, rank 1 in its own image_tokens (checked first)
  subset({{1, 3, 1, 3}, {15, 12, 15, 12}}, comm.rank() == 0 ? std::vector<std::int32_t>{1, 3, 1, 3} : std::vector<std::int32_t>{15, 12, 15, 12},
         listed, &heads_kv, comm.rank() == 0 ? "ulysses.rank_tokens[1] of sample 0 is not strictly ascending" : "image_tokens of sample 0 is not strictly ascending");
  subset(two_each, {}, listed, &heads_kv, "ulysses.rank_tokens is set: image_tokens must be this rank's list (or select = image_selection::none");
  {
    std::vector<float> rows;
    sd3::forward_options o;
    o.select = none;
    bool good = false;
    std::string what = "(nothing thrown)";
    try {
      net2.forward(ok.inputs(), rows, o);
    } catch (const std::invalid_argument& e) {
      what = e.what();
      good = what.find("a forward of zero image tokens runs only under ulysses with rank_tokens") != std::string::npos;
    }
    expect(good, "image_selection::none without ulysses refused by name, got: " + what, comm.rank());
  }
}

// A whole SpecDiff run (RFlow Euler, token level: the cached feature is a token's velocity row), one process
// against two ranks: the ranks plan with sharded_accelerator<global_plan>, run token-subset forwards over their
// share of the C1 tokens with every layer's K/V exchanged (sd3::sequence_parallel, the piece the demo's
// --sequence-parallel runs on), and all-gather the updated latent rows after every step. Every step's global C1 set
// must equal one process's, and the final latents must match within 1e-5.
struct specdiff_run {
  std::vector<std::vector<specdiff::index_t>> c1;  // per step: sample 0's global C1 ids
  std::vector<float> latents;                     // final, [B, C, H, W]
  int empty_shares = 0;                           // steps where a rank computed none of the C1 tokens
};

// comm == nullptr: one process, all tokens.
// ulysses: the sampler's forwards by head exchange (sd3::sequence_parallel::use_ulysses: token-subset forwards with every
// rank's share in ulysses.rank_tokens, an empty share running a forward of zero image tokens).
specdiff_run run_specdiff(const test_util::random_problem& p, sd3::transformer& net, specdiff::mpi_communicator* comm,
                          double cache_rate = 0.5, bool ulysses = false) {
  constexpr int steps = 8;
  const int B = p.batch, T = p.tokens(), P = net.patch_features();
  const int ranks = comm ? comm->size() : 1;
  const specdiff::accelerator_config config{T, B, steps, P, 1, 1, true};
  const specdiff::step_schedule schedule{2, 0, 2, {}};
  const specdiff::three_level_classifier classifier(cache_rate);
  specdiff::accelerator<specdiff::specdiff_scorer, specdiff::self_speculation, specdiff::three_level_classifier, specdiff::step_schedule>
      plain(config, {}, {}, classifier, schedule);
  std::optional<specdiff::sharded_accelerator<specdiff::specdiff_scorer, specdiff::self_speculation, specdiff::three_level_classifier,
                                              specdiff::step_schedule, specdiff::mpi_communicator>>
      sharded;
  std::optional<sd3::sequence_parallel<specdiff::mpi_communicator>> sp;
  if (comm) {
    sharded.emplace(*comm, config, specdiff::specdiff_scorer{}, specdiff::self_speculation{}, classifier, schedule);
    sp.emplace(*comm, net, B, T);
    sp->use_ulysses(ulysses);
  }
  const specdiff::token_shard sh = specdiff::token_shard::of(T, comm ? comm->rank() : 0, ranks);

  std::vector<float> latents = p.latents, x_rows(static_cast<std::size_t>(B) * T * P);
  net.velocity_to_rows(B, p.height, p.width, latents, x_rows);
  sd3::kv_cache kv(net, B, T);
  std::vector<float> probe(static_cast<std::size_t>(B) * T), timesteps(static_cast<std::size_t>(B));
  sd3::forward_options o;
  o.kv = &kv;
  o.attention_probe = probe;
  auto inputs_at = [&](float t) {
    std::fill(timesteps.begin(), timesteps.end(), t);
    sd3::forward_inputs in = p.inputs();
    in.latents = latents;
    in.timesteps = timesteps;
    return in;
  };
  // One process's forward at t over `ids` ([sample][token]; empty: every token, no subset).
  auto forward = [&](float t, std::vector<std::int32_t>& ids, std::vector<float>& out) {
    o.image_tokens = ids;
    net.forward(inputs_at(t), out, o);
  };
  std::vector<float> ts;
  for (int k = 0; k <= steps; ++k) ts.push_back(1000.f * static_cast<float>(steps - k) / steps);
  // the speculative pass: full forwards on the initial latents at two main-grid timesteps
  const std::vector<float> spec{ts[0], ts[steps / 2]};
  if (comm) sharded->begin_speculation(spec); else plain.begin_speculation(spec);
  std::vector<float> full_out(static_cast<std::size_t>(B) * T * P), computed(full_out.size()), output(full_out.size());
  for (int s = 0; s < 2; ++s) {
    if (comm) {
      sp->forward_full(inputs_at(spec[static_cast<std::size_t>(s)]), full_out, probe);
      sharded->record_speculation(s, probe);
    } else {
      std::vector<std::int32_t> all;
      forward(spec[static_cast<std::size_t>(s)], all, full_out);
      plain.record_speculation(s, probe);
    }
  }
  specdiff_run result;
  std::vector<std::vector<std::int32_t>> lists(static_cast<std::size_t>(ranks));
  for (int k = 0; k < steps; ++k) {
    const float t = ts[static_cast<std::size_t>(k)], dt = (ts[static_cast<std::size_t>(k) + 1] - t) / 1000.f;
    if (!comm) {
      auto step = plain.plan_step(k, t);
      const auto c1 = step.plan(0).compute();
      result.c1.emplace_back(c1.begin(), c1.end());
      std::vector<std::int32_t> ids;
      if (!step.dense()) for (auto id : step.compute_tokens()) ids.push_back(static_cast<std::int32_t>(id));
      const int n = step.compute_count();
      std::vector<float> out(static_cast<std::size_t>(B) * (step.dense() ? T : n) * P);
      forward(t, ids, out);
      if (step.dense()) net.velocity_to_rows(B, p.height, p.width, out, computed);
      else std::copy(out.begin(), out.end(), computed.begin());
      plain.complete_step(std::move(step), specdiff::matrix_view<const float>(computed.data(), B * n, P),
                          specdiff::matrix_view<float>(output.data(), B * T, P), probe);
      for (std::size_t i = 0; i < x_rows.size(); ++i) x_rows[i] += dt * output[i];
    } else {
      auto step = sharded->plan_step(k, t);
      const auto c1 = step.global_plan_of(0).compute();  // one plan: the CFG pair shares it
      result.c1.emplace_back(c1.begin(), c1.end());
      for (int r = 0; r < ranks; ++r) {
        const auto s = specdiff::token_shard::of(T, r, ranks);
        auto& l = lists[static_cast<std::size_t>(r)];
        l.clear();
        for (auto id : c1)
          if (id >= s.begin && id < s.begin + s.count) l.push_back(static_cast<std::int32_t>(id));
        if (l.empty()) ++result.empty_shares;
      }
      const int n = step.compute_count();
      const sd3::forward_inputs in = inputs_at(t);
      for (int b = 0; b < B; ++b)
        sp->forward_sample(in, b, lists, std::span<float>(computed).subspan(static_cast<std::size_t>(b) * n * P, static_cast<std::size_t>(n) * P),
                           std::span<float>(probe).subspan(static_cast<std::size_t>(b) * T, static_cast<std::size_t>(T)));
      sharded->complete_step(std::move(step), specdiff::matrix_view<const float>(computed.data(), B * n, P),
                             specdiff::matrix_view<float>(output.data(), B * sh.count, P), probe);
      // the shard's new latent rows, then every rank's
      std::vector<float> mine(static_cast<std::size_t>(B) * sh.count * P);
      for (int b = 0; b < B; ++b)
        for (specdiff::index_t i = 0; i < sh.count * P; ++i) {
          const std::size_t g = (static_cast<std::size_t>(b) * T + sh.begin) * P + static_cast<std::size_t>(i);
          mine[static_cast<std::size_t>(b * sh.count * P + i)] = x_rows[g] + dt * output[static_cast<std::size_t>(b * sh.count * P + i)];
        }
      sp->gather_shards(B, mine, x_rows);
    }
    net.rows_to_velocity(B, p.height, p.width, x_rows, latents);
  }
  result.latents = latents;
  return result;
}

// `mmdit_x`: blocks 0 and 1 with the image-only attention (a second exchange per layer). `min_empty`: steps at which
// some rank must have computed none of the C1 tokens (it then joins the exchanges without a forward).
void specdiff_run_case(specdiff::mpi_communicator& comm, const char* name, unsigned seed, bool mmdit_x, double cache_rate, int min_empty,
                       bool ulysses = false) {
  const test_util::random_problem p = mmdit_x ? test_util::random_problem(seed, true, {0, 1}) : test_util::random_problem(seed);
  sd3::transformer net(p.model, p.limits(), 1);
  const specdiff_run one = run_specdiff(p, net, nullptr, cache_rate);
  const specdiff_run two = run_specdiff(p, net, &comm, cache_rate, ulysses);
  expect(one.c1.size() == two.c1.size(), "step count", comm.rank());
  int partial = 0;
  for (std::size_t k = 0; k < one.c1.size() && k < two.c1.size(); ++k) {
    expect(one.c1[k] == two.c1[k], "C1 set of step " + std::to_string(k), comm.rank());
    if (static_cast<int>(one.c1[k].size()) < p.tokens()) ++partial;
  }
  expect(partial >= 4, "partial steps: " + std::to_string(partial), comm.rank());
  expect(two.empty_shares >= min_empty, "steps with an empty share: " + std::to_string(two.empty_shares) + ", at least " + std::to_string(min_empty), comm.rank());
  const double err = relative_l2(two.latents, one.latents);
  expect(err <= 1e-5, "latents relative L2 " + std::to_string(err), comm.rank());
  std::printf("rank %d %s (8 steps, CR %.2f, %d partial, %d empty shares): same C1 sets, latents relative L2 %.3g\n", comm.rank(), name,
              cache_rate, partial, two.empty_shares, err);
}

void sd3_specdiff_run(specdiff::mpi_communicator& comm) { specdiff_run_case(comm, "specdiff run (SD3)", 13, false, 0.5, 0); }
// A rank with no C1 token: at CR 0.95 a step computes ceil(0.05 T) tokens, often all in one shard.
void sd3_specdiff_empty_share(specdiff::mpi_communicator& comm) {
  specdiff_run_case(comm, "specdiff run with empty shares (SD3 MMDiT-X)", 11, true, 0.95, 1);
}
// The same two runs with the sampler's forwards by head exchange (Ulysses): the same C1 sets, latents within 1e-5.
void sd3_ulysses_specdiff_run(specdiff::mpi_communicator& comm) { specdiff_run_case(comm, "Ulysses specdiff run (SD3)", 13, false, 0.5, 0, true); }
void sd3_ulysses_specdiff_empty_share(specdiff::mpi_communicator& comm) {
  specdiff_run_case(comm, "Ulysses specdiff run with empty shares (SD3 MMDiT-X)", 11, true, 0.95, 1, true);
}
}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int code = 2;
  {
    specdiff::mpi_communicator comm;
    const std::string which = argc == 2 ? argv[1] : "";
    try {
      if (which == "sd3_forward") sd3_forward(comm);
      else if (which == "flux_forward") flux_forward(comm);
      else if (which == "sd3_specdiff_run") sd3_specdiff_run(comm);
      else if (which == "sd3_specdiff_empty_share") sd3_specdiff_empty_share(comm);
      else if (which == "sd3_ulysses") sd3_ulysses(comm);
      else if (which == "flux_ulysses") flux_ulysses(comm);
      else if (which == "ulysses_refused") ulysses_refused(comm);
      else if (which == "sd3_ulysses_sampler") sd3_ulysses_sampler(comm);
      else if (which == "sd3_ulysses_subset") sd3_ulysses_subset(comm);
      else if (which == "flux_ulysses_uneven") flux_ulysses_uneven(comm);
      else if (which == "sd3_ulysses_specdiff_run") sd3_ulysses_specdiff_run(comm);
      else if (which == "sd3_ulysses_specdiff_empty_share") sd3_ulysses_specdiff_empty_share(comm);
      else if (which == "flux_ulysses_subset") flux_ulysses_subset(comm);
      else throw std::invalid_argument("usage: specdiff_engine_sp_tests sd3_forward|flux_forward|sd3_specdiff_run|sd3_specdiff_empty_share|"
                                       "sd3_ulysses|flux_ulysses|ulysses_refused|sd3_ulysses_sampler|sd3_ulysses_subset|flux_ulysses_subset|"
                                       "sd3_ulysses_specdiff_run|sd3_ulysses_specdiff_empty_share|flux_ulysses_uneven");
      int total = 0;
      MPI_Allreduce(&failures, &total, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
      code = total == 0 ? 0 : 1;
    } catch (...) {
      comm.fail(std::current_exception());
    }
  }
  MPI_Finalize();
  return code;
}
