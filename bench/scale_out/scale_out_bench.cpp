// Scale-out benchmark (issue 31, docs/scale-out.md, docs/results.md "Scale-out"): what sequence parallelism costs.
//
// Measured (under `mpirun -n 2`): the engine's sequence-parallel forward (sd3::sequence_parallel: token-subset
// forwards with every layer's K/V all-gathered) on a random SD3 model, per step: the wall time of the step, the time
// inside the collectives (MPI_Wtime around each, through a timing communicator: transfer plus waiting for the other
// rank), the bytes each rank sends and receives, for a full step and a SpecDiff partial step (a cache rate's share of
// the tokens computed, the same random C1 set on every rank), and the global plan's exchange (one all_reduce_sum of
// batch * T floats). One untimed warm-up, then --repeats timed steps: medians with min-max. Rank 0 then runs the same
// full step alone (rank 1 waits) for the one-process time. Also the full step by head exchange (Ulysses:
// forward_options::ulysses, its all-to-alls timed the same way) where T and the heads split over the ranks.
//
// Modelled (--model-only, one process): the same quantities at SD3-medium and FLUX shapes on 2 to 8 GPUs, from FLOP
// counts and a link bandwidth (parameters, printed with the table).
#include <mpi.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include <specdiff/mpi/communicator.hpp>

#include "sd3/model.hpp"
#include "sd3/sequence_parallel.hpp"
#include "sd3/transformer.hpp"

namespace {

// A communicator that times and counts what passes through it (the engine and the library see only the concept).
// Each collective is preceded by a barrier, timed apart: `waited` is the time a rank waits for the slower one (load
// imbalance, a busy core), `seconds` the collective itself once both are there (the transfer).
struct timed_communicator {
  specdiff::mpi_communicator& inner;
  double seconds = 0, waited = 0, sent = 0, received = 0;
  int calls = 0;
  void wait() {
    const double t = MPI_Wtime();
    MPI_Barrier(inner.handle());
    waited += MPI_Wtime() - t;
  }
  int rank() const { return inner.rank(); }
  int size() const { return inner.size(); }
  void all_gather(std::span<const float> send, std::span<const specdiff::index_t> counts, std::span<float> recv) {
    wait();
    const double t = MPI_Wtime();
    inner.all_gather(send, counts, recv);
    seconds += MPI_Wtime() - t;
    sent += static_cast<double>(send.size_bytes());
    received += static_cast<double>(recv.size_bytes() - send.size_bytes());
    ++calls;
  }
  void all_reduce_sum(std::span<float> values) {
    wait();
    const double t = MPI_Wtime();
    inner.all_reduce_sum(values);
    seconds += MPI_Wtime() - t;
    sent += static_cast<double>(values.size_bytes());  // the payload each way (reduce to rank 0, then broadcast)
    received += static_cast<double>(values.size_bytes());
    ++calls;
  }
  void all_to_all(std::span<const float> send, std::span<float> recv) {  // Ulysses (forward_options::ulysses)
    wait();
    const double t = MPI_Wtime();
    inner.all_to_all(send, recv);
    seconds += MPI_Wtime() - t;
    const double others = static_cast<double>(send.size_bytes()) * (size() - 1) / size();  // this rank's own block stays
    sent += others;
    received += others;
    ++calls;
  }
  void all_to_all_v(std::span<const float> send, std::span<const specdiff::index_t> send_counts, std::span<float> recv,
                    std::span<const specdiff::index_t> recv_counts) {  // Ulysses token subsets (ulysses.rank_tokens)
    wait();
    const double t = MPI_Wtime();
    inner.all_to_all_v(send, send_counts, recv, recv_counts);
    seconds += MPI_Wtime() - t;
    const auto me = static_cast<std::size_t>(rank());  // this rank's own block stays
    sent += static_cast<double>(send.size_bytes()) - 4.0 * static_cast<double>(send_counts[me]);
    received += static_cast<double>(recv.size_bytes()) - 4.0 * static_cast<double>(recv_counts[me]);
    ++calls;
  }
  [[noreturn]] void fail(std::exception_ptr e) { inner.fail(e); }
  void clear() { seconds = waited = sent = received = 0, calls = 0; }
};
static_assert(specdiff::all_to_all_communicator<timed_communicator>);

struct stats {
  double median = 0, min = 0, max = 0;
};
stats of(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return {n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]), v.front(), v.back()};
}
std::string ms(const stats& s) {
  char t[96];
  std::snprintf(t, sizeof t, "%.3f (%.3f-%.3f)", 1e3 * s.median, 1e3 * s.min, 1e3 * s.max);
  return t;
}

struct shape {
  int side = 32, heads = 2, head_dim = 64, layers = 4;
};

void measure(specdiff::mpi_communicator& mpi, const shape& sh, int repeats, double cache_rate, int threads) {
  sd3::transformer_config c;
  c.sample_size = sh.side;
  c.pos_embed_max_size = sh.side / 2;
  c.in_channels = c.out_channels = 1;
  c.num_layers = sh.layers;
  c.num_attention_heads = sh.heads;
  c.attention_head_dim = sh.head_dim;
  c.joint_attention_dim = 64;
  c.caption_projection_dim = sh.heads * sh.head_dim;
  c.pooled_projection_dim = 64;
  const auto model = sd3::model::random(c, 7);
  const int batch = 1, ctx = 1, T = (sh.side / 2) * (sh.side / 2), D = sh.heads * sh.head_dim;
  sd3::transformer net(model, {.max_batch = batch, .max_height = sh.side, .max_width = sh.side, .max_context_tokens = ctx}, threads);
  std::mt19937 rng(3);
  std::normal_distribution<float> n;
  auto draw = [&](std::size_t k) {
    std::vector<float> v(k);
    for (auto& x : v) x = n(rng);
    return v;
  };
  const auto latents = draw(static_cast<std::size_t>(batch) * sh.side * sh.side), context = draw(static_cast<std::size_t>(batch) * ctx * 64),
             pooled = draw(static_cast<std::size_t>(batch) * 64);
  const std::vector<float> timesteps(batch, 500.f);
  const sd3::forward_inputs in{.batch = batch, .height = sh.side, .width = sh.side, .context_tokens = ctx, .latents = latents,
                               .timesteps = timesteps, .context = context, .pooled = pooled};
  timed_communicator comm{mpi};
  sd3::sequence_parallel<timed_communicator> sp(comm, net, batch, T);
  const int P = comm.size(), rank = comm.rank();
  std::vector<float> velocity(latents.size()), probe(static_cast<std::size_t>(T));
  // the partial step's C1 set: the same random tokens on every rank (seeded), split by shard
  const int n_c1 = std::max(1, static_cast<int>(std::ceil((1.0 - cache_rate) * T)));
  std::vector<std::int32_t> all(static_cast<std::size_t>(T));
  std::iota(all.begin(), all.end(), 0);
  std::shuffle(all.begin(), all.end(), std::mt19937(11));
  std::vector<std::int32_t> c1(all.begin(), all.begin() + n_c1);
  std::sort(c1.begin(), c1.end());
  std::vector<std::vector<std::int32_t>> lists(static_cast<std::size_t>(P));
  for (int r = 0; r < P; ++r) {
    const auto s = specdiff::token_shard::of(T, r, P);
    for (auto t : c1)
      if (t >= s.begin && t < s.begin + s.count) lists[static_cast<std::size_t>(r)].push_back(t);
  }
  std::vector<float> rows(lists[static_cast<std::size_t>(rank)].size() * static_cast<std::size_t>(net.patch_features()));
  std::vector<float> sums(static_cast<std::size_t>(batch) * T, 1.f);

  struct series {
    std::vector<double> total, exchange, waited, sent, received;
    int calls = 0;
  };
  auto run = [&](series& s, auto&& step) {
    for (int k = -1; k < repeats; ++k) {  // k = -1: warm-up
      MPI_Barrier(MPI_COMM_WORLD);
      comm.clear();
      const double t = MPI_Wtime();
      step();
      const double total = MPI_Wtime() - t;
      if (k < 0) continue;
      s.total.push_back(total);
      s.exchange.push_back(comm.seconds);
      s.waited.push_back(comm.waited);
      s.sent.push_back(comm.sent);
      s.received.push_back(comm.received);
      s.calls = comm.calls;
    }
  };
  series full, partial, plan, ulysses;
  run(full, [&] { sp.forward_full(in, velocity, probe); });
  // the same full step by head exchange (Ulysses): the shard's forward with q|k|v all-to-all'd over heads, then the
  // shards' rows gathered as forward_full gathers them (needs T % P == 0 and heads % P == 0)
  const bool ulysses_runs = T % P == 0 && sh.heads % P == 0;
  if (ulysses_runs) {
    const auto shard = specdiff::token_shard::of(T, rank, P);
    std::vector<std::int32_t> ids(static_cast<std::size_t>(shard.count));
    std::iota(ids.begin(), ids.end(), static_cast<std::int32_t>(shard.begin));
    std::vector<float> shard_rows(ids.size() * static_cast<std::size_t>(net.patch_features())),
        gathered(static_cast<std::size_t>(T) * static_cast<std::size_t>(net.patch_features()));
    sd3::forward_options o;
    o.image_tokens = ids;
    o.attention_probe = probe;
    o.ulysses = {rank, P, [&](std::span<const float> send, std::span<float> recv) { comm.all_to_all(send, recv); }};
    run(ulysses, [&] {
      net.forward(in, shard_rows, o);
      sp.gather_shards(batch, shard_rows, gathered);
      net.rows_to_velocity(batch, sh.side, sh.side, gathered, velocity);
    });
  }
  run(partial, [&] { sp.forward_sample(in, 0, lists, rows, probe); });
  // the same partial step by head exchange (Ulysses token subset: every rank's share in ulysses.rank_tokens, exchanged
  // with per-rank counts; its K/V cache of the rank's heads filled by one Ulysses full forward first)
  series ulysses_partial;
  const bool ulysses_partial_runs = sh.heads % P == 0;
  if (ulysses_partial_runs) {
    sd3::sequence_parallel<timed_communicator> sp_u(comm, net, batch, T);
    sp_u.use_ulysses(true);
    sp_u.forward_full(in, velocity, probe);
    run(ulysses_partial, [&] { sp_u.forward_sample(in, 0, lists, rows, probe); });
  }
  run(plan, [&] { comm.all_reduce_sum(sums); });
  // one process, the same full step (rank 0 alone; the others wait)
  std::vector<double> alone;
  for (int k = -1; k < repeats; ++k) {
    MPI_Barrier(MPI_COMM_WORLD);
    if (rank == 0) {
      const double t = MPI_Wtime();
      net.forward(in, velocity);
      if (k >= 0) alone.push_back(MPI_Wtime() - t);
    }
  }
  // rank 0 prints every rank's numbers (gathered), one row per (step kind, rank)
  for (int r = 0; r < P; ++r) {
    for (auto* s : {&full, &ulysses, &partial, &ulysses_partial, &plan}) {
      if (s == &ulysses && !ulysses_runs) continue;
      if (s == &ulysses_partial && !ulysses_partial_runs) continue;
      const char* kind = s == &full ? "full step" : s == &ulysses ? "full step, Ulysses" : s == &partial ? "partial step"
                       : s == &ulysses_partial ? "partial step, Ulysses" : "global-plan exchange";
      std::vector<double> mine;
      for (auto* v : {&s->total, &s->exchange, &s->waited}) mine.insert(mine.end(), v->begin(), v->end());
      mine.push_back(s->sent.empty() ? 0 : s->sent.front());
      mine.push_back(s->received.empty() ? 0 : s->received.front());
      mine.push_back(s->calls);
      mine.push_back(static_cast<double>(lists[static_cast<std::size_t>(rank)].size()));
      if (r != 0) {
        if (rank == r) MPI_Send(mine.data(), static_cast<int>(mine.size()), MPI_DOUBLE, 0, 0, MPI_COMM_WORLD);
        if (rank == 0) MPI_Recv(mine.data(), static_cast<int>(mine.size()), MPI_DOUBLE, r, 0, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
      }
      if (rank != 0) continue;
      const auto R = static_cast<std::ptrdiff_t>(repeats);
      std::vector<double> total(mine.begin(), mine.begin() + R), exch(mine.begin() + R, mine.begin() + 2 * R),
          waited(mine.begin() + 2 * R, mine.begin() + 3 * R), compute(total.size());
      for (std::size_t i = 0; i < total.size(); ++i) compute[i] = total[i] - exch[i] - waited[i];
      const double sent = mine[static_cast<std::size_t>(3 * R)], received = mine[static_cast<std::size_t>(3 * R + 1)];
      const int calls = static_cast<int>(mine[static_cast<std::size_t>(3 * R + 2)]);
      const auto tokens = s == &full || s == &ulysses ? specdiff::token_shard::of(T, r, P).count : s == &partial || s == &ulysses_partial ? static_cast<int>(mine.back()) : 0;
      std::printf("| T=%d D=%d L=%d | %s | %d | %d | %s | %s | %s | %s | %.1f | %.1f | %d |\n", T, D, sh.layers, kind, r, tokens,
                  ms(of(total)).c_str(), ms(of(exch)).c_str(), ms(of(waited)).c_str(), ms(of(compute)).c_str(), sent / 1024.0, received / 1024.0, calls);
    }
  }
  if (rank == 0)
    std::printf("| T=%d D=%d L=%d | full step, one process | - | %d | %s | - | - | - | - | - | - |\n", T, D, sh.layers, T, ms(of(alone)).c_str());
}

// --- the model ---
struct model_shape {
  const char* name;
  double tokens, hidden, blocks, context, batch;
};
// FLOPs of one block for one sample with `q` image query tokens against T image keys (2 per multiply-add):
// q/k/v/out (4 D^2) and the 4x MLP (8 D^2) per token, every context token too, and attention's two products.
double block_flops(const model_shape& s, double q) {
  const double rows = q + s.context, keys = s.tokens + s.context;
  return 2.0 * (12.0 * s.hidden * s.hidden * rows + 2.0 * rows * keys * s.hidden);
}

void model_table(double bandwidth_gbs, double tflops, double latency_us, double cache_rate) {
  const model_shape shapes[] = {{"SD3-medium 1024px (T=4096, D=1536, 24 blocks, CFG batch 2)", 4096, 1536, 24, 333, 2},
                                {"FLUX 1024px (T=4096, D=3072, 19+38 blocks, batch 1)", 4096, 3072, 57, 512, 1},
                                {"FLUX 2048px (T=16384, D=3072, 19+38 blocks, batch 1)", 16384, 3072, 57, 512, 1}};
  const double bw = bandwidth_gbs * 1e9, flops = tflops * 1e12, alpha = latency_us * 1e-6, bf16 = 2, f32 = 4;
  std::printf("Model: %.0f GB/s per GPU and direction, %.0f TFLOP/s achieved per GPU, %.0f us per collective, bf16 activations, "
              "SpecDiff cache rate %.2f\n\n", bandwidth_gbs, tflops, latency_us, cache_rate);
  std::printf("| shape | GPUs | full step compute/GPU ms | K/V all-gather ms (%% of compute) | Ulysses all-to-all ms (%%) | partial step "
              "compute/GPU ms | K/V ms (%%) | Ulysses ms (%%) | saved by the partial step ms | global-plan exchange us (%% of saved) |\n");
  std::printf("|---|---|---|---|---|---|---|---|---|---|\n");
  for (const auto& s : shapes)
    for (const int P : {2, 4, 8}) {
      const double n = std::ceil((1 - cache_rate) * s.tokens), f = (P - 1.0) / P;
      const double full = s.batch * s.blocks * block_flops(s, s.tokens) / P / flops;
      const double part = s.batch * s.blocks * block_flops(s, n) / P / flops;
      // per block: K/V all-gather receives (P-1)/P of 2 x rows x D; Ulysses: 4 all-to-alls (q, k, v in; out back)
      // each sending (P-1)/P of the rank's rows/P x D
      const auto kv = [&](double rows) { return s.batch * s.blocks * (2 * rows * s.hidden * f * bf16 / bw + alpha); };
      const auto ul = [&](double rows) { return s.batch * s.blocks * (4 * rows * s.hidden * f / P * bf16 / bw + 4 * alpha); };
      const double plan = 2 * f * s.batch * s.tokens * f32 / bw + alpha;  // one all_reduce of batch x T floats (ring)
      const double saved = full + kv(s.tokens) - part - kv(n);
      std::printf("| %s | %d | %.2f | %.3f (%.0f%%) | %.3f (%.0f%%) | %.2f | %.3f (%.0f%%) | %.3f (%.0f%%) | %.2f | %.1f (%.2f%%) |\n", s.name, P,
                  1e3 * full, 1e3 * kv(s.tokens), 100 * kv(s.tokens) / full, 1e3 * ul(s.tokens), 100 * ul(s.tokens) / full, 1e3 * part,
                  1e3 * kv(n), 100 * kv(n) / part, 1e3 * ul(n), 100 * ul(n) / part, 1e3 * saved, 1e6 * plan, 100 * plan / saved);
    }
  // the break-even: the smallest T at which the partial step saves more than the plan's exchange costs
  std::printf("\nBreak-even (the global plan's exchange equals what a partial step saves), SD3-medium widths, 8 GPUs: T = ");
  model_shape s = shapes[0];
  for (double T = 1; T <= 1e6; T *= 1.05) {
    s.tokens = T;
    const double P = 8, n = std::ceil((1 - cache_rate) * T);
    const double saved = s.batch * s.blocks * (block_flops(s, T) - block_flops(s, n)) / P / flops;
    const double plan = 2 * (P - 1) / P * s.batch * T * f32 / bw + alpha;
    if (saved > plan) {
      std::printf("%.0f tokens\n", T);
      break;
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Scale-out: sequence-parallel communication against compute, measured on MPI ranks and modelled on GPUs"};
  bool model_only = false;
  int repeats = 5, threads = 1;
  double bandwidth = 450, tflops = 600, latency = 10, cache_rate = 0.9;
  std::vector<int> sides{32, 48};
  int heads = 4;
  app.add_flag("--model-only", model_only, "print the modelled table only (no MPI ranks needed)");
  app.add_option("--repeats", repeats, "timed steps after one warm-up (medians and min-max)")->capture_default_str()->check(CLI::Range(1, 1000));
  app.add_option("--threads", threads, "engine threads per rank")->capture_default_str()->check(CLI::Range(1, 64));
  app.add_option("--sides", sides, "latent sides of the measured random SD3 models (patch 2: T = (side/2)^2)")->capture_default_str()->check(CLI::Range(4, 512));
  app.add_option("--heads", heads, "attention heads of the measured models (head dim 64)")->capture_default_str()->check(CLI::Range(1, 64));
  app.add_option("--bandwidth-gbs", bandwidth, "model: link bandwidth per GPU and direction, GB/s (H100 NVLink 4: 450)")->capture_default_str()->check(CLI::PositiveNumber);
  app.add_option("--tflops", tflops, "model: achieved dense bf16 TFLOP/s per GPU (H100 SXM peak 989; 600 is about 60%)")->capture_default_str()->check(CLI::PositiveNumber);
  app.add_option("--latency-us", latency, "model: fixed cost per collective, microseconds")->capture_default_str()->check(CLI::NonNegativeNumber);
  app.add_option("--cache-rate", cache_rate, "SpecDiff's cache rate for the partial step")->capture_default_str()->check(CLI::Range(0.0, 0.999));
  CLI11_PARSE(app, argc, argv);
  if (model_only) {
    model_table(bandwidth, tflops, latency, cache_rate);
    return 0;
  }
  MPI_Init(&argc, &argv);
  {
    specdiff::mpi_communicator comm;
    try {
      if (comm.rank() == 0) {
        std::printf("Measured: %d ranks, %d engine thread(s) each, %d timed steps after a warm-up, cache rate %.2f, batch 1; times in ms "
                    "median (min-max); transfer = inside the collectives, wait = in a barrier before each (the other rank still computing); compute = step - "
                    "transfer - wait; KiB per rank and step\n\n",
                    comm.size(), threads, repeats, cache_rate);
        std::printf("| model | step | rank | tokens computed | step ms | transfer ms | wait ms | compute ms | KiB sent | KiB received | collectives |\n");
        std::printf("|---|---|---|---|---|---|---|---|---|---|---|\n");
      }
      for (const int side : sides) measure(comm, {side, heads, 64, 4}, repeats, cache_rate, threads);
    } catch (...) {
      comm.fail(std::current_exception());
    }
  }
  MPI_Finalize();
  return 0;
}
