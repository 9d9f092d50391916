// SpecDiff and its peers on the reference engine. Each method is the library's components composed
// differently; see docs/results.md for what each one caches and the defaults' sources.
#pragma once

#include <limits>
#include <optional>
#include <string>
#include <vector>

#include <specdiff/forecast_steps.hpp>
#include <specdiff/learned.hpp>
#include <specdiff/predictors.hpp>

#include "methods/run.hpp"

namespace methods {

/// How a token-level method fills the rows it does not compute (its C3 rows): SpecDiff's mix of the last three
/// (`specdiff`), the latest row (`latest`), a first-order Taylor step through the last two (`linear`, TaylorSeer's
/// order 1), weights fitted per step by least squares (`learned`: a specdiff::learned_table, see
/// specdiff-calibrate), or FoCa's BDF2-type forecast through the last three (`foca`: specdiff::foca).
enum class c3_rule { specdiff, latest, linear, learned, foca };

/// Full RFlow: every step, every token (the reference every method is measured against).
run_result run_full(const problem& p, const progress_fn& progress = {});

/// Plain fewer-step RFlow: the naive baseline at `steps` steps.
run_result run_steps(const problem& p, int steps, const progress_fn& progress = {});

/// SpecDiff at token level (RAS-style structure): an S-step speculative pass records attention; each
/// main step scores his·fut·star, classifies C1/C2/C3; C1 image tokens (+ all context) run every block
/// against cached K/V; C2 reuse their last output, C3 get the weighted mix of their last three.
struct specdiff_options {
  double cache_rate = 0.9;
  int spec_steps = 2;
  double reuse_mass = 0.10;
  int warmup_steps = 2;      ///< dense steps at the start
  int refresh_interval = 0;  ///< a dense step every this many steps after warm-up (0 = none)
  std::vector<int> reset_steps = {14};  ///< further dense steps
  float starvation_scale = 1.f;
  bool share_cfg_plan = true;
  using c3_rule = methods::c3_rule;
  c3_rule c3 = c3_rule::specdiff;  ///< how C3 rows are filled
  const specdiff::learned_table* learned_weights = nullptr;  ///< c3 = learned: fitted for this problem's timesteps
  /// SpecDiff-adaptive: a dense step as soon as the error verified since the last one (specdiff::accelerator::
  /// verified_error, summed over partial steps) exceeds this; infinity = only the fixed dense steps (SpecDiff).
  double error_budget = std::numeric_limits<double>::infinity();
  int max_partial_steps = 0;  ///< with an error budget: at most this many partial steps in a row (0 = no limit)
  /// Cache-rate buckets (highest first; empty = `cache_rate` on every partial step): after a partial step whose
  /// verified error was e, the next caches at cache_rate_buckets[min(floor(e / bucket_error_step), last)].
  std::vector<double> cache_rate_buckets = {};
  float bucket_error_step = 0.1f;
  /// Self-calibration: while set, every partial step's computed rows and their histories are added here.
  specdiff::history_fit* calibrate = nullptr;
  bool context_queries = false;  ///< his/fut also count the attention paid by the context (class) tokens
  /// Where the speculative pass evaluates the model (specdiff::speculative_grid): `aligned` main-grid
  /// timesteps, or the sampler's own S-step schedule (0.1's choice).
  specdiff::speculative_grid spec_grid = specdiff::speculative_grid::aligned;
  /// What ranks the tokens, for measuring what the ranking is worth: the paper's his·fut·star (`specdiff`);
  /// his·star with the same speculative pass (`no_future`: the future factor off at equal FLOPs); staleness
  /// alone (`round_robin`: the uniform scorer with starvation, no attention read).
  enum class ranking { specdiff, no_future, round_robin } rank = ranking::specdiff;
};
run_result run_specdiff(const problem& p, const specdiff_options& o, const progress_fn& progress = {});

/// SpecDiff-adaptive, the library's composition beyond the paper: SpecDiff's speculative ranking and levels,
/// a dense step whenever the free verification's accumulated error passes `error_budget`, and the chosen C3
/// rule. The settings differ from run_specdiff's only in these defaults (docs/methods.md says how they were chosen).
specdiff_options specdiff_adaptive_defaults(double error_budget = 0.05);
/// SpecDiff's speculative pass for a problem (none when spec_steps = 0): the sampler the pass integrates
/// along, at the timesteps spec_grid chooses.
std::optional<sd3::flow_match_euler> speculative_pass(const problem& p, const specdiff_options& o);

struct tacache_table;  // below: TACache's fitted statistics

/// Output forecasting between full steps, L2P's structure (shared/research/beyond.md, section 2; its authors' code
/// is not published): full steps are the warm-up and then every `interval`-th; on the others the whole network is
/// skipped and every token's model output is the C3 rule's forecast from its outputs at the last full steps —
/// `learned`: per-step least-squares weights fitted on full trajectories (calibrate_forecast); `linear` is
/// TaylorSeer's order-1 rule at the output, `latest` reuses the output (FORA at the output).
struct forecast_options {
  int interval = 3;
  /// Full steps at the start; 0 = by the interval: 3 for N <= 2 (diffusers' TaylorSeerCache's disable_cache_before_step:
  /// 0.3's 2 forecast step 2 from steps 0 and 1, where the output still changes fastest; +2.4 dB at N = 2 on mnist-sd3),
  /// 2 for N >= 3 (there a third warm-up step costs more than it gives: docs/results.md).
  int warmup_steps = 0;
  /// Which steps after the warm-up run in full: `library` = the step_schedule's refresh rule, step k full iff
  /// (k - warmup + 1) % interval == 0 (warm-up 2, N = 2: 0, 1, 3, 5, ..., 27); `diffusers` = TaylorSeerCache's,
  /// k full iff (k - warmup - 1) % interval == 0 (its disable_cache_before_step = warm-up 3, N = 2: 0, 1, 2, 4, ..., 26).
  enum class refresh_rule { library, diffusers } refresh = refresh_rule::library;
  c3_rule c3 = c3_rule::learned;
  const specdiff::learned_table* learned_weights = nullptr;  ///< c3 = learned: from calibrate_forecast, for this interval
  /// c3 = linear: what the Taylor rule differentiates over — the step index (`step`, diffusers' TaylorSeerCache: its
  /// differences are divided by the gap in steps counted per forward call) or the timestep (`timestep`, 0.3's). The
  /// learned rule reads its table by timestep whatever this says.
  enum class taylor_variable { step, timestep } variable = taylor_variable::step;
  int order = 1;  ///< c3 = linear: the Taylor order (1 or 2), TaylorSeer's recursive divided differences (specdiff::taylorseer)
  /// Predictor-corrector weight in [0, 1] (FoCa's "calibrate" at the output level, docs/methods.md; 0 = off): at each
  /// full step, once its true output is known, the outputs of the steps forecast since the previous full step are
  /// re-estimated by the polynomial through the newest three full outputs (interpolation over timesteps, the new one
  /// included), and the latent is moved by `correct` times what that changes, sum_k s_k (interpolated_k - forecast_k)
  /// with s_k the Euler step size — as if each of those steps had stepped with (1 - correct) forecast + correct
  /// interpolated. It is added to the full step's own output divided by its step size; the cache keeps the true
  /// outputs and no model call is added. Steps forecast after the last full step stay uncorrected. Any c3 rule.
  /// 0.5 (the two estimates averaged, as Heun's corrector averages) was measured best (docs/results.md, issue 30).
  double correct = 0.0;
  /// TACache's compensation instead of the c3 rule (tacache_table; fitted for exactly this schedule's full steps).
  const tacache_table* tacache = nullptr;
  /// calibrate_forecast: fit the weights on the rows of both CFG halves (`halves`, the default), or on the guided output
  /// v_u + g (v_c - v_u) the sampler steps with (`guided`: measured 0.9 dB worse at N = 2 on mnist-sd3, docs/results.md).
  enum class fit_target { guided, halves } fit_on = fit_target::halves;
  /// calibrate_forecast: teacher forcing (`full`: the pairs lie on the full-compute trajectory, L2P's) or the
  /// forecast's own trajectory (`forecast`: the latents follow the forecast with `learned_weights`, or the Taylor rule
  /// when none is given, and every skipped step's true output is computed there to pair with the history; DAgger's idea).
  enum class fit_trajectory { full, forecast } trajectory = fit_trajectory::full;
  /// Explicit full steps (strictly increasing, step 0 first; each below the run's steps): when not empty, exactly these
  /// steps run in full and warmup_steps, interval and refresh are not read — a schedule placed where the trajectory
  /// bends (specdiff::rank_full_steps, chosen on calibration noise by specdiff-calibrate --full-steps).
  std::vector<int> full_steps = {};
  /// The warm-up steps a run uses (warmup_steps, or its default by the interval).
  int warmup() const { return warmup_steps > 0 ? warmup_steps : interval <= 2 ? 3 : 2; }
};
run_result run_forecast(const problem& p, const forecast_options& o, const progress_fn& progress = {});

/// TACache's direction-aware compensation (arXiv 2605.16789, "skip then compensate"; docs/methods.md) at the output
/// of a forecast. Contract: per sample vector (one CFG half of one sample: all its tokens' output rows), with v the
/// output of the latest full step, d = v - (the output of the full step before it), u = v / |v|, p = <d, u> (the
/// sample's own change along its velocity) and o = d - p u (its orthogonal residual), a forecast step k's output is
///   v_k = (alpha_k |v| + beta_k p) u + gamma_k o,
/// with (alpha_k, beta_k) and gamma_k per step, fitted by least squares on full trajectories (teacher forced) of
/// calibration noise by calibrate_tacache, and the projections p, o taken online from the sample being generated.
/// Before a second full step there is no d: v_k = alpha_k v. Linear extrapolation is alpha = 1, beta = gamma = k / gap;
/// a learned table of depth 2 is the special case beta = gamma. Data-dependent (a per-sample projection), so not a
/// library approximator: a forecast option, replacing the c3 rule when set. Steps are the table's `full_steps`.
struct tacache_table {
  std::vector<int> full_steps;            ///< every full step of the schedule it was fitted for (step 0 first)
  std::vector<double> alpha, beta, gamma;  ///< per step; NaN at full steps
  int vectors = 0;                         ///< sample vectors the fit saw per step (calibration samples x CFG halves)
};
/// Full RFlow on `p` (calibration noise: the caller's choice, recorded nowhere else) with o's schedule; fits `out`.
run_result calibrate_tacache(const problem& p, const forecast_options& o, tacache_table& out, const progress_fn& progress = {});
/// The learned forecast's calibration: full RFlow (teacher-forced: every step computed), the outputs of o's full
/// steps cached and, on every other step, each token's (cached outputs, true output) pair added to `fit`.
run_result calibrate_forecast(const problem& p, const forecast_options& o, specdiff::history_fit& fit, const progress_fn& progress = {});
/// Full RFlow with every step's model output kept: the inner products of each pair of steps' outputs are added to
/// `gram` (specdiff::trajectory_gram) — over both CFG halves' rows (what the learned weights are fitted on) and over the
/// guided output the sampler steps with (what forecast_error measures). `step_weight` gets each step's Euler step size
/// sigma_next - sigma (the weight of its output in the final latent). One trajectory per call.
run_result forecast_gram(const problem& p, specdiff::trajectory_gram& gram, std::vector<double>& step_weight, const progress_fn& progress = {});

/// RAS (Region-Adaptive Sampling), SD3 script defaults: output-level metric (here the L2 norm of the
/// velocity over channels, averaged per patch: our model has one channel, where RAS's channel std is 0),
/// starvation exp(scale·drop_count), dense before step 4 and at steps 12 and 20, cached tokens reuse
/// their last output; computed tokens run every block against cached K/V. Both CFG halves share one plan.
struct ras_options {
  double cache_rate = 0.5;   ///< 1 - sample_ratio
  int warmup_steps = 4;
  std::vector<int> reset_steps = {12, 20};
  float starvation_scale = 1.f;
  double high_ratio = 0.3;   ///< share of the cached set taken from the highest-metric tokens
  /// Which output the metric is measured on: RAS's scheduler step sees the guided velocity
  /// v_u + g (v_c - v_u) (`guided`, the authors'); `halves_mean` averages the metric of the two halves (0.2's).
  enum class metric_input { guided, halves_mean } metric_on = metric_input::guided;
  /// The drop count in exp(scale·drop_count): RAS counts every time a token was cached and never resets it
  /// (`cumulative`, the authors'); `since_computed` restarts it when the token is computed (0.2's).
  enum class drop_count_rule { cumulative, since_computed } drop_count = drop_count_rule::cumulative;
};
run_result run_ras(const problem& p, const ras_options& o, const progress_fn& progress = {});

/// Per-layer module caching (ToCa, FORA, TaylorSeer): per block and stream, the attention and MLP
/// outputs (before the gate) are cached on full steps and reused or forecast on the others.
struct module_cache_options {
  enum class kind { fora, toca, taylorseer } method = kind::fora;
  int interval = 3;          ///< a full step every `interval` steps after warm-up
  int warmup_steps = 1;      ///< full steps at the start
  double cache_rate = 0.9;   ///< ToCa: share of image tokens whose MLP is reused (1 - fresh ratio)
  float starvation_scale = 0.f;  ///< ToCa: staleness weight in the score
  /// ToCa: the CFG halves share one selection, scored from their mean attention (the authors', PixArt-ToCa);
  /// false plans each half on its own (0.2's).
  bool share_cfg_plan = true;
  int order = 1;             ///< TaylorSeer: Taylor order (1 or 2)
  /// TaylorSeer's forecast: `authors` = its code's finite differences, each divided by the last gap between
  /// full steps, starting at step warmup_steps - 2 (specdiff::taylorseer); `polynomial` = a polynomial through
  /// the last order+1 full steps (specdiff::taylor, 0.2's).
  enum class forecast_rule { authors, polynomial } forecast = forecast_rule::authors;
};
run_result run_module_cache(const problem& p, const module_cache_options& o, const progress_fn& progress = {});

// --- Step-level caching (step_level.cpp): a whole step's network, or its middle blocks, skipped when a cheap
// proxy has barely moved; the decision is specdiff::relative_change_gate's, shared by the whole model batch
// (CFG pair and samples), as the authors' code decides once per forward call. `model_calls` counts the steps
// whose network ran in full; a skipped step still runs the embedding, the always-computed blocks and the final
// layer, and `flops` counts them.

/// First-Block cache (diffusers FirstBlockCache, after ParaAttention's FBCache) with cache-dit DBCache's Fn/Bn:
/// each step runs the first `front_blocks` blocks; if the relative L1 change of their image-stream residual
/// (hidden after them minus hidden before block 0) against the last computed step's is below `threshold`, the
/// middle blocks are skipped and their residual cached on the last computed step (both streams) is added;
/// then the last `back_blocks` blocks run. Otherwise everything runs and both caches are refreshed.
struct fbcache_options {
  double threshold = 0.05;         ///< diffusers FirstBlockCacheConfig's default (cache-dit DBCache: 0.08)
  int front_blocks = 1;            ///< Fn: 1 = FBCache (DBCache's default 8 needs a deeper model)
  int back_blocks = 0;             ///< Bn (DBCache's default 0)
  int warmup_steps = 0;            ///< steps always computed at the start; the first always is (DBCache: 8)
  int max_consecutive_skips = -1;  ///< -1 = no limit (diffusers has none, cache-dit's default is -1)
  int max_skips = -1;              ///< skipped steps per run, -1 = no limit
};
run_result run_fbcache(const problem& p, const fbcache_options& o, const progress_fn& progress = {});

/// TeaCache (ali-vilab/TeaCache, FLUX port): per step, the relative L1 change of block 0's timestep-modulated
/// image input LN(x)(1 + scale_msa) + shift_msa against the previous step's is rescaled and accumulated; while
/// the sum stays below `threshold` the whole network is skipped and the residual of the last computed step
/// (hidden after the last block minus hidden before block 0) is added. The first and last steps compute.
struct teacache_options {
  double threshold = 0.6;  ///< teacache_flux.py's setting (README: 0.25 / 0.4 / 0.6 / 0.8 for 1.5x .. 2.25x on FLUX)
  /// flux: the authors' FLUX polynomial (fitted on FLUX, not on our models; they ship none for SD3);
  /// identity: the raw relative change.
  enum class rescale_kind { flux, identity } rescale = rescale_kind::flux;
  int max_consecutive_skips = -1;  ///< -1 = no limit (TeaCache has none)
};
run_result run_teacache(const problem& p, const teacache_options& o, const progress_fn& progress = {});

}  // namespace methods
