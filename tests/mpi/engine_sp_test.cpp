// The reference engine, sequence-parallel by K/V exchange on two MPI ranks (docs/scale-out.md): rank r runs a
// token-subset forward over its token shard, and forward_options::kv_exchange all-gathers every layer's fresh
// keys and values before a query reads them. Checked against one process's full forward: the shard's output
// rows and the attention probe (the ranks' partial column sums, summed) within 1e-5 relative L2, for SD3
// (with MMDiT-X's image-only attention) and FLUX. `mpirun -n 2 specdiff_engine_sp_tests <case>`.
#include <mpi.h>

#include <cmath>
#include <cstdio>
#include <stdexcept>
#include <string>

#include <specdiff/mpi/communicator.hpp>

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
      else throw std::invalid_argument("usage: specdiff_engine_sp_tests sd3_forward|flux_forward");
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
