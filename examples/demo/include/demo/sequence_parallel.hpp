// The demo's methods with the image tokens split over ranks (--sequence-parallel; docs/scale-out.md): full RFlow and
// SpecDiff, on the engine's sequence-parallel forwards (sd3::sequence_parallel: token-subset forwards with every
// layer's keys and values all-gathered, or, with use_ulysses, their q|k|v exchanged over heads) and the library's sharded accelerator with the global plan, so every rank
// makes the plans one process makes. Every rank ends a run with the whole latents; the FLOPs are the model's, as
// one process counts them (the context stream, which every rank computes whole, is counted once).
#pragma once

#include <chrono>
#include <cmath>
#include <stdexcept>
#include <memory>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include <specdiff/sharded.hpp>
#include <specdiff/specdiff.hpp>

#include "demo/support.hpp"
#include "methods/flops.hpp"
#include "sd3/errors.hpp"
#include "sd3/sequence_parallel.hpp"

namespace demo {

/// The methods --sequence-parallel runs.
inline constexpr const char* sequence_parallel_method_names[] = {"full", "specdiff"};

/// "" when `spec` runs sequence-parallel, else why not, naming the option and its value.
inline std::string sequence_parallel_refusal(const method_spec& spec) {
  const auto methods = [] {
    std::string s;
    for (const char* m : sequence_parallel_method_names) s += (s.empty() ? "" : ", ") + std::string(m);
    return s;
  };
  if (spec.name != "full" && spec.name != "specdiff")
    return sd3::message("--method ", spec.name, ": not available with --sequence-parallel (it runs: ", methods(), ")");
  if (spec.name == "specdiff" && spec.c3 && *spec.c3 != "specdiff")
    return sd3::message("--c3 ", *spec.c3, ": --sequence-parallel runs SpecDiff's own C3 rule only (--c3 specdiff)");
  return "";
}

/// How SpecDiff over ranks selects its C1 tokens (specdiff::global_plan or specdiff::per_shard_plan; --shard-plan).
enum class shard_plan { global, per_shard };

/// Runs full RFlow and SpecDiff over the ranks of `comm` on one problem (the K/V caches are made once, here).
template <specdiff::communicator Comm>
class sequence_parallel_runner {
 public:
  sequence_parallel_runner(Comm& comm, const methods::problem& p, shard_plan plan = shard_plan::global)
      : p_(p), plan_(plan), sp_(comm, *p.net, methods::model_batch(p), methods::image_tokens(p)) {}

  /// Every forward by head exchange (Ulysses) instead of the K/V exchange (the demo's --ulysses): full RFlow and
  /// SpecDiff alike (its partial steps give every rank's share of C1 to the head exchange, an empty share included).
  void use_ulysses(bool on) { sp_.use_ulysses(on); }

  /// Every rank calls it with the same arguments. Throws std::invalid_argument for what
  /// sequence_parallel_refusal refuses.
  methods::run_result run(const method_spec& spec, const methods::progress_fn& progress = {}) {
    if (const auto why = sequence_parallel_refusal(spec); !why.empty()) throw std::invalid_argument(why);
    sp_.reset();
    return spec.name == "full" ? run_full(progress) : run_specdiff(specdiff_options_of(spec), progress);
  }

 private:
  using clock = std::chrono::steady_clock;

  methods::run_result run_full(const methods::progress_fn& progress) {
    const sd3::transformer& c = *p_.net;
    const int batch = methods::model_batch(p_), tokens = methods::image_tokens(p_);
    const auto scheduler = p_.schedule(p_.steps);
    methods::run_result r;
    const auto start = clock::now();
    r.latents = sd3::sample_cfg(*p_.net, scheduler, p_.inputs, p_.guidance, [&](const sd3::model_call& call) {
      sp_.forward_full(*call.inputs, call.velocity);
      r.flops += batch * methods::full_forward_flops(c, tokens, p_.inputs.context_tokens);
      ++r.model_calls;
      if (progress) progress(r.model_calls, p_.steps);
    });
    r.seconds = methods::seconds_since(start);
    return r;
  }

  methods::run_result run_specdiff(const methods::specdiff_options& o, const methods::progress_fn& progress) {
    // What methods::run_specdiff can do and this cannot yet (the verified error and the feature changes are not
    // exchanged between ranks): refused by name rather than run differently.
    if (std::isfinite(o.error_budget)) throw std::invalid_argument(sd3::message("error_budget: ", o.error_budget, ": not sequence-parallel yet (infinity only)"));
    if (!o.cache_rate_buckets.empty()) throw std::invalid_argument("cache_rate_buckets: not sequence-parallel yet (one cache rate only)");
    if (o.c3 != methods::c3_rule::specdiff) throw std::invalid_argument("c3: not sequence-parallel yet (SpecDiff's own rule only)");
    if (o.rank != methods::specdiff_options::ranking::specdiff) throw std::invalid_argument("rank: not sequence-parallel yet (his * fut * star only)");
    if (o.calibrate != nullptr) throw std::invalid_argument("calibrate: not sequence-parallel yet");
    if (o.context_queries) throw std::invalid_argument("context_queries: not sequence-parallel yet (every rank computes the context queries)");
    if (plan_ == shard_plan::per_shard) {
      if (o.spec_steps > 0) return run_specdiff_with<specdiff::per_shard_plan>(o, specdiff::self_speculation{}, progress);
      return run_specdiff_with<specdiff::per_shard_plan>(o, specdiff::no_speculation{}, progress);
    }
    if (o.spec_steps > 0) return run_specdiff_with<specdiff::global_plan>(o, specdiff::self_speculation{}, progress);
    return run_specdiff_with<specdiff::global_plan>(o, specdiff::no_speculation{}, progress);
  }

  // SpecDiff as methods::run_specdiff runs it (the same scorer, classifier, schedule and C3 rule), with one
  // sharded accelerator per plan (a CFG pair sharing its plan, or one sample): a rank's share of a plan's C1 set
  // differs between plans, and the global plan takes one plan per accelerator.
  // per_shard_plan: each rank plans its shard alone; the ranks' C1 lists are then all-gathered (a count, then the ids)
  // so that every rank can place the others' keys and values.
  template <class Policy, class Predictor>
  methods::run_result run_specdiff_with(const methods::specdiff_options& o, Predictor predictor, const methods::progress_fn& progress) {
    using accelerator = specdiff::sharded_accelerator<specdiff::specdiff_scorer, Predictor, specdiff::three_level_classifier,
                                                      specdiff::step_schedule, Comm, Policy>;
    constexpr bool global = std::is_same_v<Policy, specdiff::global_plan>;
    const sd3::transformer& c = *p_.net;
    const int batch = methods::model_batch(p_), tokens = methods::image_tokens(p_), features = c.patch_features(), ctx = p_.inputs.context_tokens;
    const bool share = o.share_cfg_plan && batch % 2 == 0 && p_.guidance > 1.f;
    const int members = share ? 2 : 1, plans = batch / members;
    // plan g's samples: g and g + batch / 2 ([uncond; cond]) when shared, else g
    const auto sample_of = [&](int g, int m) { return g + m * (batch / 2); };
    std::vector<specdiff::index_t> resets;
    for (const int k : o.reset_steps)
      if (k < p_.steps) resets.push_back(k);
    const specdiff::step_schedule schedule{o.warmup_steps, o.refresh_interval, o.spec_steps, resets};
    const specdiff::accelerator_config config{.tokens = tokens, .batch = members, .steps = p_.steps, .feature_dim = features, .share_cfg_plan = share};
    std::vector<std::unique_ptr<accelerator>> acc;
    for (int g = 0; g < plans; ++g)
      acc.push_back(std::make_unique<accelerator>(sp_.communicator(), config, specdiff::specdiff_scorer{o.starvation_scale}, predictor,
                                                  specdiff::three_level_classifier(o.cache_rate, o.reuse_mass), schedule));
    const auto speculative = methods::speculative_pass(p_, o);
    if (speculative)
      for (auto& a : acc) a->begin_speculation(std::span<const float>(speculative->timesteps()));

    const int ranks = sp_.ranks(), rank = sp_.rank();
    const auto shard = sp_.shard();
    const auto T = static_cast<std::size_t>(tokens), F = static_cast<std::size_t>(features), S = static_cast<std::size_t>(shard.count);
    std::vector<float> probe(static_cast<std::size_t>(batch) * T), pair_probe(static_cast<std::size_t>(members) * T);
    std::vector<float> computed(static_cast<std::size_t>(members) * S * F), output(computed.size()), shard_rows(static_cast<std::size_t>(batch) * S * F),
        rows(static_cast<std::size_t>(batch) * T * F);
    std::vector<std::vector<std::int32_t>> lists(static_cast<std::size_t>(ranks));
    for (auto& l : lists) l.reserve(T);
    std::vector<std::optional<typename accelerator::step>> steps(static_cast<std::size_t>(plans));
    const auto gather_probe = [&](int g) {
      for (int m = 0; m < members; ++m)
        std::copy_n(probe.begin() + static_cast<std::ptrdiff_t>(static_cast<std::size_t>(sample_of(g, m)) * T), T,
                    pair_probe.begin() + static_cast<std::ptrdiff_t>(static_cast<std::size_t>(m) * T));
    };

    methods::run_result r;
    const int total = (speculative ? speculative->steps() : 0) + p_.steps;
    const auto tick = [&] {
      ++r.model_calls;
      if (progress) progress(r.model_calls, total);
    };
    const auto start = clock::now();
    if (speculative) {  // every token computed, split over the ranks; the partial probes go to the planners
      r.speculative_latents = sd3::sample_cfg(*p_.net, *speculative, p_.inputs, p_.guidance, [&](const sd3::model_call& call) {
        sp_.forward_full(*call.inputs, call.velocity, probe);
        methods::stopwatch::scope s(r.overhead_seconds);
        for (int g = 0; g < plans; ++g) {
          gather_probe(g);
          acc[static_cast<std::size_t>(g)]->record_speculation(call.step, pair_probe);
        }
        r.flops += batch * methods::full_forward_flops(c, tokens, ctx);
        tick();
      });
      r.speculative_seconds = methods::seconds_since(start);
    }
    const auto scheduler = p_.schedule(p_.steps);
    r.latents = sd3::sample_cfg(*p_.net, scheduler, p_.inputs, p_.guidance, [&](const sd3::model_call& call) {
      {
        methods::stopwatch::scope s(r.overhead_seconds);
        for (int g = 0; g < plans; ++g) steps[static_cast<std::size_t>(g)].emplace(acc[static_cast<std::size_t>(g)]->plan_step(call.step, call.timestep));
      }
      int computed_tokens = 0;  // plan 0's |C1| over all ranks (every plan has the same count)
      for (int g = 0; g < plans; ++g) {
        auto& step = *steps[static_cast<std::size_t>(g)];
        if constexpr (global) {
          const auto c1 = step.global_plan_of(0).compute();
          if (g == 0) computed_tokens = static_cast<int>(c1.size());
          for (int q = 0; q < ranks; ++q) {
            const auto s = specdiff::token_shard::of(tokens, q, ranks);
            auto& l = lists[static_cast<std::size_t>(q)];
            l.clear();
            for (const auto id : c1)
              if (id >= s.begin && id < s.begin + s.count) l.push_back(static_cast<std::int32_t>(id));
          }
        } else {
          gather_lists(step, shard, lists);
          if (g == 0) {
            computed_tokens = 0;
            for (const auto& l : lists) computed_tokens += static_cast<int>(l.size());
          }
        }
        const std::size_t n = lists[static_cast<std::size_t>(rank)].size();
        if (static_cast<specdiff::index_t>(n) != step.compute_count())
          throw std::logic_error(sd3::message("plan ", g, ": the shard's ", step.compute_count(), " C1 tokens are not the global plan's ", n));
        for (int m = 0; m < members; ++m) {
          const int b = sample_of(g, m);
          sp_.forward_sample(*call.inputs, b, lists, std::span<float>(computed).subspan(static_cast<std::size_t>(m) * n * F, n * F),
                             std::span<float>(probe).subspan(static_cast<std::size_t>(b) * T, T));
        }
        methods::stopwatch::scope s(r.overhead_seconds);
        gather_probe(g);
        acc[static_cast<std::size_t>(g)]->complete_step(
            std::move(step), specdiff::matrix_view<const float>(computed.data(), static_cast<specdiff::index_t>(members * n), features),
            specdiff::matrix_view<float>(output.data(), static_cast<specdiff::index_t>(members) * shard.count, features), pair_probe);
        steps[static_cast<std::size_t>(g)].reset();
        for (int m = 0; m < members; ++m)
          std::copy_n(output.begin() + static_cast<std::ptrdiff_t>(static_cast<std::size_t>(m) * S * F), S * F,
                      shard_rows.begin() + static_cast<std::ptrdiff_t>(static_cast<std::size_t>(sample_of(g, m)) * S * F));
      }
      {
        methods::stopwatch::scope s(r.overhead_seconds);
        sp_.gather_shards(batch, shard_rows, rows);
        c.rows_to_velocity(batch, call.inputs->height, call.inputs->width, rows, call.velocity);
      }
      if (computed_tokens == tokens) ++r.dense_steps;
      if (computed_tokens == tokens) r.flops += batch * methods::full_forward_flops(c, tokens, ctx);
      else if (computed_tokens > 0) r.flops += batch * methods::subset_forward_flops(c, tokens, ctx, computed_tokens);
      tick();
    });
    r.seconds = methods::seconds_since(start);
    return r;
  }

  // Every rank's C1 ids of a per-shard step (global, ascending): the counts, then the ids, all-gathered as floats
  // (exact: ids < 2^24).
  template <class Step>
  void gather_lists(const Step& step, const specdiff::token_shard& shard, std::vector<std::vector<std::int32_t>>& lists) {
    const int ranks = sp_.ranks();
    const auto n = static_cast<std::size_t>(step.compute_count());
    const auto ids = step.compute_tokens().first(n);  // sample 0's (a shared plan: the same for its pair)
    count_send_.assign(1, static_cast<float>(n));
    counts_.assign(static_cast<std::size_t>(ranks), 1);
    rank_counts_.resize(static_cast<std::size_t>(ranks));
    sp_.communicator().all_gather(count_send_, counts_, rank_counts_);
    id_send_.resize(n);
    for (std::size_t i = 0; i < n; ++i) id_send_[i] = static_cast<float>(ids[i] + shard.begin);
    std::size_t total = 0;
    for (int q = 0; q < ranks; ++q) {
      counts_[static_cast<std::size_t>(q)] = static_cast<specdiff::index_t>(rank_counts_[static_cast<std::size_t>(q)]);
      total += static_cast<std::size_t>(counts_[static_cast<std::size_t>(q)]);
    }
    id_recv_.resize(total);
    sp_.communicator().all_gather(id_send_, counts_, id_recv_);
    std::size_t at = 0;
    for (int q = 0; q < ranks; ++q) {
      auto& l = lists[static_cast<std::size_t>(q)];
      l.clear();
      for (specdiff::index_t i = 0; i < counts_[static_cast<std::size_t>(q)]; ++i) l.push_back(static_cast<std::int32_t>(id_recv_[at++]));
    }
  }

  const methods::problem& p_;
  shard_plan plan_;
  sd3::sequence_parallel<Comm> sp_;
  std::vector<float> count_send_, rank_counts_, id_send_, id_recv_;
  std::vector<specdiff::index_t> counts_;
};

}  // namespace demo
