// SpecDiff's three-level classification on the device, for every sample of a batch at once, reproducing
// the host three_level_classifier's plan exactly (ranking by score descending, ties by index ascending).
//
//   1. keys: (sample, score) packed in 64 bits so that one ascending radix sort orders samples first and,
//      within a sample, scores descending; values: token indices. Radix sort is stable and the values start
//      ascending, so equal scores keep ascending indices: the host's tie-break, with no extra key bits.
//   2. C2 mass: an inclusive scan by sample over the ranks from the bottom of exp(s - max) — the max is the
//      first sorted key — gives each bottom run's mass and, as its last element, the sample's total.
//   3. boundary: the first rank from the bottom whose share exceeds reuse_mass (a warp-aggregated atomicMin,
//      order-independent); C2 = the ranks below it, never a C1 rank. Taking the *first* exceedance keeps C2
//      a contiguous bottom run even if rounding made the scanned sums non-monotone.
//   4. levels by rank; then a stable three-way split by one exclusive scan of packed per-level counters
//      (21 bits each) over tokens in index order: every level's list comes out ascending, laid out
//      C1 | C2 | C3 per sample as token_plan does. |C1| is static; |C2|, |C3| stay on the device.
//
// Everything is stream-ordered, allocation-free and capturable in a CUDA graph; the workspace is the
// caller's, sized by CUB's two-phase query (classify with a null workspace, or workspace_bytes()).
//
// Masses are double sums as on the host but summed in another order, so a token whose cumulative share is
// within ~1e-15 of reuse_mass could land in the other level than on the host.
#pragma once

#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_scan.cuh>
#include <thrust/iterator/counting_iterator.h>
#include <thrust/iterator/transform_iterator.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "../math.hpp"
#include "error.cuh"
#include "plan.cuh"
#include "status.cuh"
#include "views.cuh"

namespace specdiff::gpu {

template <int BlockThreads = 256>
struct classify_policy {
  static_assert(BlockThreads % 32 == 0 && BlockThreads <= 1024);
  static constexpr int block_threads = BlockThreads;
};

namespace detail {

/// Float -> 32 bits whose unsigned order is the float order reversed (descending), with -0 folded onto +0
/// (the host compares them equal, so they must tie) and NaN ranked as -inf.
SPECDIFF_HD inline std::uint32_t descending_bits(float s) {
  if (s != s) s = -INFINITY;
  if (s == 0.f) s = 0.f;
  std::uint32_t u;
  memcpy(&u, &s, sizeof u);
  const std::uint32_t ascending = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return ~ascending;
}

/// Inverse of descending_bits (for canonical inputs).
SPECDIFF_HD inline float from_descending_bits(std::uint32_t d) {
  const std::uint32_t ascending = ~d;
  const std::uint32_t u = (ascending & 0x80000000u) ? (ascending & 0x7fffffffu) : ~ascending;
  float s;
  memcpy(&s, &u, sizeof s);
  return s;
}

SPECDIFF_HD inline std::uint64_t rank_key(index_t sample, float score) {
  return (static_cast<std::uint64_t>(static_cast<std::uint32_t>(sample)) << 32) | descending_bits(score);
}
SPECDIFF_HD inline float key_score(std::uint64_t key) { return from_descending_bits(static_cast<std::uint32_t>(key)); }

/// Per-level counters packed in one 64-bit word, 21 bits each: a plain integer sum adds all three at once.
inline constexpr int counter_bits = 21;
inline constexpr std::uint64_t counter_mask = (std::uint64_t{1} << counter_bits) - 1;
SPECDIFF_HD inline std::uint64_t level_counter(level l) { return std::uint64_t{1} << (counter_bits * static_cast<int>(l)); }
SPECDIFF_HD inline index_t counter_of(std::uint64_t packed, level l) {
  return static_cast<index_t>((packed >> (counter_bits * static_cast<int>(l))) & counter_mask);
}

/// Position j of the reversed ranking (j = 0 is sample b's lowest score) -> exp(s - max) as a double.
struct reversed_share {
  const std::uint64_t* sorted;
  index_t tokens;
  SPECDIFF_HD double operator()(index_t j) const {
    const index_t b = j / tokens, r = tokens - 1 - (j - b * tokens);
    const std::ptrdiff_t base = static_cast<std::ptrdiff_t>(b) * tokens;
    return exp(static_cast<double>(key_score(sorted[base + r]) - key_score(sorted[base])));
  }
};

struct sample_of {
  index_t tokens;
  SPECDIFF_HD index_t operator()(index_t j) const { return j / tokens; }
};

struct counter_of_level {
  SPECDIFF_HD std::uint64_t operator()(level l) const { return level_counter(l); }
};

/// The per-element rules of steps 3-4, shared by the kernels and by the sequential model of this pipeline
/// that the host suite checks against the host classifier (tests/cuda/main.cu).
struct classify_rules {
  index_t tokens;
  index_t c1;
  double reuse_mass;

  /// Ranks a C2 may take: every rank below C1.
  SPECDIFF_HD index_t reusable() const { return tokens - c1; }

  /// Step 3: for reversed position j (sample b = j / tokens, its jl-th lowest rank), jl when the bottom
  /// run up to it holds more than reuse_mass of the sample's total, else -1. `suffix` is the inclusive
  /// scan by sample of reversed_share; its last element per sample is the total.
  SPECDIFF_HD index_t exceedance(const double* suffix, index_t j) const {
    const index_t b = j / tokens, jl = j - b * tokens;
    if (jl >= reusable()) return -1;
    const double total = suffix[static_cast<std::ptrdiff_t>(b) * tokens + tokens - 1];
    return suffix[j] / total > reuse_mass ? jl : -1;
  }

  /// Step 4: the level of rank r (0 = highest score) when the first exceedance is at reversed position c2
  /// (so the C2 run is the c2 lowest ranks).
  SPECDIFF_HD level level_of_rank(index_t r, index_t c2) const {
    return r < c1 ? level::compute : (tokens - 1 - r < c2 ? level::reuse : level::approximate);
  }

  /// Step 4: where a token of level l goes in its sample's C1 | C2 | C3 segment, given the packed counts
  /// of the sample's tokens before it.
  SPECDIFF_HD index_t list_position(level l, std::uint64_t before, index_t c2) const {
    const index_t begin = l == level::compute ? 0 : l == level::reuse ? c1 : c1 + c2;
    return begin + counter_of(before, l);
  }
};

template <int BlockThreads>
__global__ void __launch_bounds__(BlockThreads) prepare_kernel(const float* scores, index_t batch, classify_rules rules, std::uint64_t* keys,
                                                               index_t* values, index_t* first_exceed, std::uint32_t* status) {
  const index_t tokens = rules.tokens, total = batch * tokens;
  for (index_t p = blockIdx.x * BlockThreads + threadIdx.x; p < total; p += gridDim.x * BlockThreads) {
    const index_t b = p / tokens, i = p - b * tokens;
    const float s = scores[p];
    if (!isfinite(s)) raise_status(status, status_nonfinite_score);
    keys[p] = rank_key(b, s);
    values[p] = i;
    if (i == 0) first_exceed[b] = rules.reusable();  // none found yet: every non-C1 rank may be C2
  }
}

template <int BlockThreads>
__global__ void __launch_bounds__(BlockThreads) boundary_kernel(const double* suffix, index_t batch, classify_rules rules, index_t* first_exceed) {
  const index_t tokens = rules.tokens, total = batch * tokens;
  // The loop bound is block-uniform so that whole warps reach the warp collectives.
  for (index_t base = blockIdx.x * BlockThreads; base < total; base += gridDim.x * BlockThreads) {
    const index_t j = base + static_cast<index_t>(threadIdx.x);
    const int b = j < total ? j / tokens : -1;
    const index_t jl = j < total ? rules.exceedance(suffix, j) : -1;
    const unsigned candidate = jl < 0 ? 0xffffffffu : static_cast<unsigned>(jl);
#if __CUDA_ARCH__ >= 800
    // One atomic per (warp, sample) instead of one per thread: most ranks exceed, all on one address.
    const unsigned same = __match_any_sync(0xffffffffu, b);
    const unsigned least = __reduce_min_sync(same, candidate);
    if (b >= 0 && least != 0xffffffffu && static_cast<int>(threadIdx.x % 32) == __ffs(static_cast<int>(same)) - 1)
      atomicMin(first_exceed + b, static_cast<index_t>(least));
#else
    if (b >= 0 && candidate != 0xffffffffu) atomicMin(first_exceed + b, static_cast<index_t>(candidate));
#endif
  }
}

template <int BlockThreads>
__global__ void __launch_bounds__(BlockThreads) assign_kernel(const index_t* ranked, index_t batch, classify_rules rules,
                                                              const index_t* first_exceed, level* levels) {
  const index_t tokens = rules.tokens, total = batch * tokens;
  for (index_t p = blockIdx.x * BlockThreads + threadIdx.x; p < total; p += gridDim.x * BlockThreads) {
    const index_t b = p / tokens, r = p - b * tokens;
    levels[static_cast<std::ptrdiff_t>(b) * tokens + ranked[p]] = rules.level_of_rank(r, first_exceed[b]);
  }
}

template <int BlockThreads>
__global__ void __launch_bounds__(BlockThreads) lists_kernel(const level* levels, const std::uint64_t* prefix, index_t batch, classify_rules rules,
                                                             const index_t* first_exceed, index_t* order, index_t* counts) {
  const index_t tokens = rules.tokens, total = batch * tokens;
  for (index_t p = blockIdx.x * BlockThreads + threadIdx.x; p < total; p += gridDim.x * BlockThreads) {
    const index_t b = p / tokens, i = p - b * tokens;
    const std::ptrdiff_t base = static_cast<std::ptrdiff_t>(b) * tokens;
    const index_t c2 = first_exceed[b];
    // prefix counts every sample's tokens before p; the difference leaves sample b's own.
    order[base + rules.list_position(levels[p], prefix[p] - prefix[base], c2)] = i;
    if (i == 0) {
      counts[b * level_count + 0] = rules.c1;
      counts[b * level_count + 1] = c2;
      counts[b * level_count + 2] = tokens - rules.c1 - c2;
    }
  }
}

}  // namespace detail

/// The device model of three_level_classifier for `batch` samples of `tokens` tokens. Construction runs the
/// CUB size queries, so it needs the device the classifier will run on to be current.
template <class Policy = classify_policy<>>
class three_level_classifier {
 public:
  three_level_classifier(index_t tokens, index_t batch, double cache_rate, double reuse_mass = 0.10)
      : tokens_(tokens), batch_(batch), cache_rate_(cache_rate), reuse_mass_(reuse_mass) {
    if (tokens <= 0) detail::fail("tokens: must be positive, got ", tokens);
    if (batch <= 0) detail::fail("batch: must be positive, got ", batch);
    specdiff::detail::expect_cache_rate(cache_rate);  // the host classifier's checks
    specdiff::detail::expect_reuse_mass(reuse_mass);
    if (static_cast<long long>(batch) * tokens > static_cast<long long>(detail::counter_mask))
      detail::fail("batch * tokens: ", batch, " * ", tokens, " exceeds ", detail::counter_mask, " (the packed level counters' range)");
    c1_ = math::compute_count(cache_rate, tokens);
    sample_bits_ = static_cast<int>(std::bit_width(static_cast<unsigned>(batch - 1)));
    size_workspace();
  }

  index_t tokens() const { return tokens_; }
  index_t batch() const { return batch_; }
  double cache_rate() const { return cache_rate_; }
  double reuse_mass() const { return reuse_mass_; }
  /// |C1| of every sample: static, so the engine's GEMM shapes are.
  index_t compute_count() const { return c1_; }
  std::size_t workspace_bytes() const { return layout_bytes_; }

  /// Classifies log_score ([batch][tokens]) into `plan`. With a null workspace, only sets workspace_bytes.
  void classify(void* workspace, std::size_t& workspace_bytes, device_span<const float> log_score, const device_plan_view& plan,
                cudaStream_t stream) const {
    if (workspace == nullptr) {
      workspace_bytes = layout_bytes_;
      return;
    }
    detail::expect_workspace(workspace, workspace_bytes, layout_bytes_);
    detail::expect_span("log_score", log_score, batch_ * tokens_);
    if (plan.batch != batch_ || plan.tokens != tokens_)
      detail::fail("plan: built for ", plan.batch, " x ", plan.tokens, " tokens, classifier for ", batch_, " x ", tokens_);
    if (plan.order == nullptr || plan.levels == nullptr || plan.counts == nullptr) detail::fail("plan: null order, levels or counts");

    using L = detail::workspace_layout;
    auto* keys_in = L::at<std::uint64_t>(workspace, off_.keys_in);
    auto* keys_out = L::at<std::uint64_t>(workspace, off_.keys_out);
    auto* values_in = L::at<index_t>(workspace, off_.values_in);
    auto* ranked = L::at<index_t>(workspace, off_.values_out);
    auto* suffix = L::at<double>(workspace, off_.suffix);
    auto* prefix = L::at<std::uint64_t>(workspace, off_.prefix);
    auto* first_exceed = L::at<index_t>(workspace, off_.first_exceed);
    void* temp = L::at<void>(workspace, off_.temp);
    std::size_t temp_bytes = temp_bytes_;

    const index_t n = batch_ * tokens_;
    const detail::classify_rules rules{tokens_, c1_, reuse_mass_};
    constexpr int threads = Policy::block_threads;
    const unsigned blocks = detail::blocks_for(static_cast<std::size_t>(n), threads);

    detail::prepare_kernel<threads><<<blocks, threads, 0, stream>>>(log_score.data, batch_, rules, keys_in, values_in, first_exceed, plan.status);
    SPECDIFF_CUDA_CHECK_LAUNCH("prepare_kernel");
    SPECDIFF_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(temp, temp_bytes, keys_in, keys_out, values_in, ranked, n, 0, 32 + sample_bits_, stream));
    if (rules.reusable() > 0) {
      temp_bytes = temp_bytes_;
      SPECDIFF_CUDA_CHECK(cub::DeviceScan::InclusiveSumByKey(temp, temp_bytes, sample_keys(), shares(keys_out), suffix, n,
                                                             ::cuda::std::equal_to<>{}, stream));
      detail::boundary_kernel<threads><<<blocks, threads, 0, stream>>>(suffix, batch_, rules, first_exceed);
      SPECDIFF_CUDA_CHECK_LAUNCH("boundary_kernel");
    }
    detail::assign_kernel<threads><<<blocks, threads, 0, stream>>>(ranked, batch_, rules, first_exceed, plan.levels);
    SPECDIFF_CUDA_CHECK_LAUNCH("assign_kernel");
    temp_bytes = temp_bytes_;
    SPECDIFF_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(temp, temp_bytes, counters(plan.levels), prefix, n, stream));
    detail::lists_kernel<threads><<<blocks, threads, 0, stream>>>(plan.levels, prefix, batch_, rules, first_exceed, plan.order, plan.counts);
    SPECDIFF_CUDA_CHECK_LAUNCH("lists_kernel");
  }

 private:
  auto sample_keys() const { return thrust::make_transform_iterator(thrust::counting_iterator<index_t>(0), detail::sample_of{tokens_}); }
  auto shares(const std::uint64_t* sorted) const {
    return thrust::make_transform_iterator(thrust::counting_iterator<index_t>(0), detail::reversed_share{sorted, tokens_});
  }
  static auto counters(const level* levels) { return thrust::make_transform_iterator(levels, detail::counter_of_level{}); }

  void size_workspace() {
    // CUB sizes its workspace for the current device: without one, say so instead of a raw CUB error.
    int devices = 0;
    const cudaError_t probe = cudaGetDeviceCount(&devices);
    if (probe != cudaSuccess || devices == 0) {
      (void)cudaGetLastError();  // not sticky: clear it
      throw std::runtime_error(std::string("gpu::three_level_classifier: sizing CUB's sort and scan workspace needs a CUDA device, and none is usable (") +
                               (probe != cudaSuccess ? cudaGetErrorString(probe) : "no device") +
                               "); construct it, and ask accelerator::memory_bytes, on a machine with a GPU");
    }
    const index_t n = batch_ * tokens_;
    std::size_t sort = 0, scan_by_key = 0, scan = 0;
    SPECDIFF_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, sort, static_cast<const std::uint64_t*>(nullptr), static_cast<std::uint64_t*>(nullptr),
                                                        static_cast<const index_t*>(nullptr), static_cast<index_t*>(nullptr), n, 0,
                                                        32 + sample_bits_));
    SPECDIFF_CUDA_CHECK(cub::DeviceScan::InclusiveSumByKey(nullptr, scan_by_key, sample_keys(), shares(nullptr), static_cast<double*>(nullptr), n));
    SPECDIFF_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(nullptr, scan, counters(nullptr), static_cast<std::uint64_t*>(nullptr), n));
    temp_bytes_ = std::max({sort, scan_by_key, scan, std::size_t{1}});  // the three run one after another: one region

    const auto items = static_cast<std::size_t>(n);
    detail::workspace_layout l;
    off_.keys_in = l.add(items * sizeof(std::uint64_t));
    off_.keys_out = l.add(items * sizeof(std::uint64_t));
    off_.values_in = l.add(items * sizeof(index_t));
    off_.values_out = l.add(items * sizeof(index_t));
    off_.suffix = l.add(items * sizeof(double));
    off_.prefix = l.add(items * sizeof(std::uint64_t));
    off_.first_exceed = l.add(static_cast<std::size_t>(batch_) * sizeof(index_t));
    off_.temp = l.add(temp_bytes_);
    layout_bytes_ = l.bytes();
  }

  struct offsets {
    std::size_t keys_in, keys_out, values_in, values_out, suffix, prefix, first_exceed, temp;
  };

  index_t tokens_;
  index_t batch_;
  double cache_rate_;
  double reuse_mass_;
  index_t c1_ = 0;
  int sample_bits_ = 0;
  offsets off_{};
  std::size_t temp_bytes_ = 0;
  std::size_t layout_bytes_ = 0;
};

}  // namespace specdiff::gpu
