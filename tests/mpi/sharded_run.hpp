// A whole SpecDiff run on random rows and attention, driven once through a plain accelerator over all tokens
// (the reference) and once through a sharded_accelerator on any communicator. Every rank draws the same random
// problem; rank r's partial attention is its own draw, and the reference reads the sum of all partials in rank
// order (what the communicator's all_reduce_sum returns).
#pragma once

#include <array>
#include <chrono>
#include <cmath>
#include <cstring>
#include <cstdint>
#include <random>
#include <vector>

#include <specdiff/sharded.hpp>
#include <specdiff/specdiff.hpp>

namespace sharded_test {

using namespace specdiff;

struct problem {
  index_t tokens = 37, batch = 1, steps = 10, dim = 6;
  bool share_cfg = false;
  int ranks = 2;
  double cache_rate = 0.6;
  std::uint32_t seed = 7;
  accelerator_config config() const { return {tokens, batch, steps, dim, 1, 1, share_cfg}; }
  step_schedule schedule() const { return step_schedule{2, 0, 2, {}}; }
  std::vector<float> timesteps() const {
    std::vector<float> t;
    for (index_t k = 0; k < steps; ++k) t.push_back(1000.f * static_cast<float>(steps - k) / static_cast<float>(steps));
    return t;
  }
  // Step k's true rows (batch * tokens x dim): a smooth drift plus noise, so reuse and approximation matter.
  std::vector<float> rows(index_t k) const {
    std::mt19937 rng(seed * 1000u + static_cast<std::uint32_t>(k));
    std::normal_distribution<float> n;
    std::vector<float> r(static_cast<std::size_t>(batch * tokens * dim));
    for (std::size_t i = 0; i < r.size(); ++i) r[i] = std::sin(0.01f * static_cast<float>(i) + 0.3f * static_cast<float>(k)) + 0.1f * n(rng);
    return r;
  }
  // Rank r's partial attention at call `call` (batch * tokens, >= 0).
  std::vector<float> partial(int rank, index_t call) const {
    std::mt19937 rng(seed * 7919u + static_cast<std::uint32_t>(call) * 31u + static_cast<std::uint32_t>(rank));
    std::exponential_distribution<float> e(1.f);
    std::vector<float> a(static_cast<std::size_t>(batch * tokens));
    for (auto& x : a) x = e(rng);
    return a;
  }
  std::vector<float> sum_of_partials(index_t call) const {
    std::vector<float> s = partial(0, call);
    for (int r = 1; r < ranks; ++r) {
      const auto p = partial(r, call);
      for (std::size_t i = 0; i < s.size(); ++i) s[i] += p[i];
    }
    return s;
  }
};

/// What a run produced, per main step: every sample's C1 token ids (global ids) and the output rows.
struct record {
  std::vector<std::vector<index_t>> c1;          // [step][sample * count + i], global token ids
  std::vector<std::vector<float>> output;        // [step][row * dim + j], rows of the tokens the run owns
};

using reference_accelerator = accelerator<specdiff_scorer, self_speculation, three_level_classifier, step_schedule>;

inline record run_reference(const problem& p) {
  reference_accelerator acc(p.config(), {}, {}, three_level_classifier(p.cache_rate), p.schedule());
  const auto ts = p.timesteps();
  const std::vector<float> spec{ts[0], ts[p.steps / 2]};
  acc.begin_speculation(spec);
  for (index_t s = 0; s < 2; ++s) acc.record_speculation(s, p.sum_of_partials(100 + s));
  record out;
  std::vector<float> output(static_cast<std::size_t>(p.batch * p.tokens * p.dim)), computed(output.size());
  for (index_t k = 0; k < p.steps; ++k) {
    auto step = acc.plan_step(k, ts[static_cast<std::size_t>(k)]);
    const auto truth = p.rows(k);
    const index_t n = step.compute_count();
    const auto ids = step.compute_tokens();
    out.c1.emplace_back(ids.begin(), ids.end());
    for (index_t b = 0; b < p.batch; ++b)
      for (index_t i = 0; i < n; ++i) {
        const index_t row = b * p.tokens + ids[static_cast<std::size_t>(b * n + i)];
        std::copy_n(truth.begin() + row * p.dim, p.dim, computed.begin() + (b * n + i) * p.dim);
      }
    acc.complete_step(std::move(step), matrix_view<const float>(computed.data(), p.batch * n, p.dim),
                      matrix_view<float>(output.data(), p.batch * p.tokens, p.dim), p.sum_of_partials(k));
    out.output.push_back(output);
  }
  return out;
}

/// The same run on a sharded accelerator: C1 ids returned as global ids of this rank's shard, output rows of the
/// shard. `bad_at` >= 0: this rank hands over one computed row too few at that step.
template <class Policy, class Comm>
record run_sharded(const problem& p, Comm& comm, index_t bad_at = -1, double* library_us = nullptr) {
  sharded_accelerator<specdiff_scorer, self_speculation, three_level_classifier, step_schedule, Comm, Policy> acc(
      comm, p.config(), {}, {}, three_level_classifier(p.cache_rate), p.schedule());
  const token_shard sh = acc.shard();
  const auto ts = p.timesteps();
  const std::vector<float> spec{ts[0], ts[p.steps / 2]};
  acc.begin_speculation(spec);
  for (index_t s = 0; s < 2; ++s) acc.record_speculation(s, p.partial(comm.rank(), 100 + s));
  record out;
  std::vector<float> output(static_cast<std::size_t>(p.batch * sh.count * p.dim)), computed(output.size());
  for (index_t k = 0; k < p.steps; ++k) {
    const auto truth = p.rows(k);
    const auto attention = p.partial(comm.rank(), k);
    const auto t0 = std::chrono::steady_clock::now();
    auto step = acc.plan_step(k, ts[static_cast<std::size_t>(k)]);
    const auto t1 = std::chrono::steady_clock::now();
    const index_t n = step.compute_count();
    const auto ids = step.compute_tokens();
    std::vector<index_t> global_ids;
    for (index_t b = 0; b < p.batch; ++b)
      for (index_t i = 0; i < n; ++i) {
        const index_t token = sh.begin + ids[static_cast<std::size_t>(b * n + i)];
        global_ids.push_back(token);
        std::copy_n(truth.begin() + (b * p.tokens + token) * p.dim, p.dim, computed.begin() + (b * n + i) * p.dim);
      }
    out.c1.push_back(global_ids);
    const index_t rows = p.batch * n - (k == bad_at ? 1 : 0);
    const auto t2 = std::chrono::steady_clock::now();
    acc.complete_step(std::move(step), matrix_view<const float>(computed.data(), rows, p.dim),
                      matrix_view<float>(output.data(), p.batch * sh.count, p.dim), attention);
    if (library_us != nullptr)
      *library_us += std::chrono::duration<double, std::micro>(t1 - t0 + (std::chrono::steady_clock::now() - t2)).count();
    out.output.push_back(output);
  }
  return out;
}

/// The reference's C1 ids restricted to a shard (per sample, in order), and its output rows of the shard.
inline record restrict(const record& full, const problem& p, token_shard sh) {
  record out;
  for (const auto& ids : full.c1) {
    const index_t n = static_cast<index_t>(ids.size()) / p.batch;
    std::vector<index_t> mine;
    for (index_t b = 0; b < p.batch; ++b)
      for (index_t i = 0; i < n; ++i) {
        const index_t t = ids[static_cast<std::size_t>(b * n + i)];
        if (t >= sh.begin && t < sh.begin + sh.count) mine.push_back(t);
      }
    out.c1.push_back(mine);
  }
  for (const auto& rows : full.output) {
    std::vector<float> mine;
    for (index_t b = 0; b < p.batch; ++b)
      mine.insert(mine.end(), rows.begin() + (b * p.tokens + sh.begin) * p.dim, rows.begin() + (b * p.tokens + sh.begin + sh.count) * p.dim);
    out.output.push_back(mine);
  }
  return out;
}

// A module-level run (2 layers x 2 sites: fill, cache_rows, complete_step(step, attention)) whose scorer reads
// an engine-defined per-token metric (set_metric every step) instead of attention: the all-gather path.
struct metric_scorer {
  static constexpr specdiff::signal needs = specdiff::signal::metric | specdiff::signal::cache_count;
  float score(const token_signals& x) const { return x.metric + 0.25f * x.cache_count; }
};
inline std::vector<float> metric_of(const problem& p, index_t k) {
  std::mt19937 rng(p.seed * 131u + static_cast<std::uint32_t>(k));
  std::normal_distribution<float> n;
  std::vector<float> m(static_cast<std::size_t>(p.batch * p.tokens));
  for (auto& x : m) x = n(rng);
  return m;
}

/// `shard`: the tokens this run owns (all of them for the reference); `Acc`: a plain or a sharded accelerator.
/// C1 ids come back global; outputs are the owned rows of every (layer, site), concatenated.
template <class Acc>
record run_module_level(const problem& p, Acc& acc, token_shard sh) {
  const auto ts = p.timesteps();
  record out;
  const auto owned = static_cast<std::size_t>(p.batch * sh.count * p.dim);
  std::vector<float> filled(owned), computed(owned), metric(static_cast<std::size_t>(p.batch * sh.count));
  for (index_t k = 0; k < p.steps; ++k) {
    const auto m = metric_of(p, k);
    for (index_t b = 0; b < p.batch; ++b)
      std::copy_n(m.begin() + b * p.tokens + sh.begin, sh.count, metric.begin() + b * sh.count);
    acc.set_metric(metric);
    auto step = acc.plan_step(k, ts[static_cast<std::size_t>(k)]);
    const index_t n = step.compute_count();
    const auto ids = step.compute_tokens();
    std::vector<index_t> global_ids;
    for (index_t i = 0; i < p.batch * n; ++i) global_ids.push_back(sh.begin + ids[static_cast<std::size_t>(i)]);
    out.c1.push_back(global_ids);
    std::vector<float> rows_out;
    for (index_t layer = 0; layer < 2; ++layer)
      for (index_t site = 0; site < 2; ++site) {
        const auto truth = p.rows(100 * k + 2 * layer + site);
        std::fill(filled.begin(), filled.end(), -1.f);
        acc.fill(step, layer, site, matrix_view<float>(filled.data(), p.batch * sh.count, p.dim));
        for (index_t b = 0; b < p.batch; ++b)
          for (index_t i = 0; i < n; ++i) {
            const index_t token = sh.begin + ids[static_cast<std::size_t>(b * n + i)];
            std::copy_n(truth.begin() + (b * p.tokens + token) * p.dim, p.dim, computed.begin() + (b * n + i) * p.dim);
            std::copy_n(truth.begin() + (b * p.tokens + token) * p.dim, p.dim, filled.begin() + (b * sh.count + token - sh.begin) * p.dim);
          }
        acc.cache_rows(step, layer, site, matrix_view<const float>(computed.data(), p.batch * n, p.dim));
        rows_out.insert(rows_out.end(), filled.begin(), filled.end());
      }
    acc.complete_step(std::move(step), std::span<const float>());
    out.output.push_back(rows_out);
  }
  return out;
}

inline accelerator_config module_config(const problem& p) { return {p.tokens, p.batch, p.steps, p.dim, 2, 2, p.share_cfg}; }
using metric_reference = accelerator<metric_scorer, no_speculation, top_k_classifier, step_schedule>;
template <class Comm>
using metric_sharded = sharded_accelerator<metric_scorer, no_speculation, top_k_classifier, step_schedule, Comm>;

/// The module-level run on one process and sharded, compared: {C1 sets equal, owned rows bitwise equal, partial steps}.
template <class Comm>
std::array<bool, 2> compare_module_level(const problem& p, Comm& comm, int& partial_steps) {
  const step_schedule schedule{2, 0, 0, {}};
  metric_reference ref_acc(module_config(p), {}, {}, top_k_classifier(p.cache_rate), schedule);
  const token_shard sh = token_shard::of(p.tokens, comm.rank(), comm.size());
  const record full = run_module_level(p, ref_acc, token_shard{0, p.tokens});
  metric_sharded<Comm> acc(comm, module_config(p), {}, {}, top_k_classifier(p.cache_rate), schedule);
  const record got = run_module_level(p, acc, sh);
  // the reference's C1 ids and rows restricted to the shard
  bool same_c1 = got.c1.size() == full.c1.size(), same_rows = same_c1;
  partial_steps = 0;
  for (std::size_t k = 0; same_c1 && k < full.c1.size(); ++k) {
    const index_t n = static_cast<index_t>(full.c1[k].size()) / p.batch;
    if (n < p.tokens) ++partial_steps;
    std::vector<index_t> mine;
    for (index_t i = 0; i < p.batch * n; ++i) {
      const index_t t = full.c1[k][static_cast<std::size_t>(i)];
      if (t >= sh.begin && t < sh.begin + sh.count) mine.push_back(t);
    }
    same_c1 = same_c1 && mine == got.c1[k];
    std::vector<float> rows;
    const auto per_slot = static_cast<std::size_t>(p.batch * p.tokens * p.dim);
    for (std::size_t slot = 0; slot < 4; ++slot)
      for (index_t b = 0; b < p.batch; ++b)
        rows.insert(rows.end(), full.output[k].begin() + static_cast<std::ptrdiff_t>(slot * per_slot) + (b * p.tokens + sh.begin) * p.dim,
                    full.output[k].begin() + static_cast<std::ptrdiff_t>(slot * per_slot) + (b * p.tokens + sh.begin + sh.count) * p.dim);
    same_rows = same_rows && rows.size() == got.output[k].size() &&
                std::memcmp(rows.data(), got.output[k].data(), rows.size() * sizeof(float)) == 0;
  }
  return {same_c1, same_rows};
}

}  // namespace sharded_test
