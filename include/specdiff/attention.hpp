// Attention received per key, exactly, without the attention matrix: from the queries Q, the keys K and the
// per-query log-sum-exp (LSE) that flash-attention kernels return alongside their output,
//   his[b][k] (+)= (1 / heads) * sum_h sum_q exp(scale * q·k - lse[b][h][q]).
// Each term is the softmax probability P[b][h][q][k] (lse is the log of the row's normaliser), so this is
// the head-averaged column sum the scorers' `his` signal wants, computed as flash attention computes P:
// a tile at a time, never N x N in memory. Also a cheaper estimate (every s-th query, scaled up), and the
// Spearman rank correlation used to measure how well that estimate ranks tokens.
// The views and checks here are shared with the device kernels in <specdiff/cuda/lse.cuh>.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <numeric>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "common.hpp"
#include "storage.hpp"

namespace specdiff {

/// What a column-sum operation does with its output: replace it, or add to it (a running sum over layers).
/// Shared by the host functions here and the device models (gpu::attention_column_sums, gpu::lse_column_sums).
enum class column_mode { overwrite, accumulate };

/// The queries or keys of one attention layer: element i of the row of (sample b, head h, token t) is
/// data[b * sample_stride + h * head_stride + t * token_stride + i], i < head_dim (rows are contiguous).
/// Strides are in elements; zero means packed [batch][heads][tokens][head_dim]. An engine's
/// [batch][tokens][heads * head_dim] projection is token_stride = heads * head_dim, head_stride = head_dim,
/// sample_stride = tokens * heads * head_dim; a fused QKV row of width 3 * hidden only widens token_stride.
/// T: float or bfloat16 (any storage_type). Space says where `data` lives (host here, device for the kernels).
template <class T, memory_space Space = memory_space::host>
struct qk_rows {
  const T* data = nullptr;
  index_t batch = 1;
  index_t heads = 1;
  index_t tokens = 0;
  index_t head_dim = 0;
  std::ptrdiff_t token_stride = 0;   ///< 0 = head_dim
  std::ptrdiff_t head_stride = 0;    ///< 0 = tokens * token_stride
  std::ptrdiff_t sample_stride = 0;  ///< 0 = heads * head_stride

  SPECDIFF_HD const T* row(index_t b, index_t h, index_t t) const {
    return data + static_cast<std::ptrdiff_t>(b) * sample_stride + static_cast<std::ptrdiff_t>(h) * head_stride +
           static_cast<std::ptrdiff_t>(t) * token_stride;
  }
};

/// The log-sum-exp of each query's scaled logits, natural log, over every key the query attended (in joint
/// attention, the context keys as well: the keys summed over may be a subset of them): value of (sample b,
/// head h, query q) at data[b * sample_stride + h * head_stride + q * query_stride]. Its shape is the
/// queries'. Zero strides mean packed [batch][heads][queries], flash attention's `softmax_lse` layout.
template <memory_space Space = memory_space::host>
struct lse_values {
  const float* data = nullptr;
  std::ptrdiff_t query_stride = 0;   ///< 0 = 1
  std::ptrdiff_t head_stride = 0;    ///< 0 = queries * query_stride
  std::ptrdiff_t sample_stride = 0;  ///< 0 = heads * head_stride

  SPECDIFF_HD float at(index_t b, index_t h, index_t q) const {
    return data[static_cast<std::ptrdiff_t>(b) * sample_stride + static_cast<std::ptrdiff_t>(h) * head_stride +
                static_cast<std::ptrdiff_t>(q) * query_stride];
  }
};

/// One layer's attention as a flash-attention kernel leaves it: the queries whose attention counts (on a
/// partial step, the computed C1 queries: the view holds exactly the queries to count), the keys whose
/// received attention is wanted (all image keys, cached or fresh), the queries' LSE and the softmax scale
/// the kernel used (usually 1 / sqrt(head_dim)).
template <class T, memory_space Space = memory_space::host>
struct lse_attention {
  qk_rows<T, Space> queries;
  qk_rows<T, Space> keys;
  lse_values<Space> lse;
  float scale = 0.f;  ///< must be set: a zero or negative softmax scale is refused
};

namespace detail {

/// One strided dimension of a view, for the overlap check.
struct strided_dim {
  const char* name;  ///< the stride's name, e.g. "token_stride"
  index_t count;
  std::ptrdiff_t stride;
};

/// (count - 1) * stride + tail, or an error naming `what` when it overflows.
inline std::ptrdiff_t checked_span(std::string_view what, index_t count, std::ptrdiff_t stride, std::ptrdiff_t tail) {
  const auto reach = checked_product<std::ptrdiff_t>(what, count - 1, stride);
  if (reach > std::numeric_limits<std::ptrdiff_t>::max() - tail) fail(what, ": ", reach, " + ", tail, " elements overflow");
  return reach + tail;
}

/// Elements from the first to one past the last element a strided view addresses, after checking that no
/// two (index tuples) share an element: sorted by stride, each dimension must step over everything the
/// smaller ones span. A layout whose dimensions interleave (legal but exotic) is refused as well. Strides
/// must be non-negative (checked first, so that a negative one is named as such).
template <std::size_t N>
std::ptrdiff_t nested_extent(std::string_view view, std::array<strided_dim, N> dims, std::ptrdiff_t row_length) {
  std::sort(dims.begin(), dims.end(), [](const strided_dim& a, const strided_dim& b) { return a.stride < b.stride; });
  std::ptrdiff_t extent = row_length;
  for (const auto& d : dims) {
    if (d.count == 1) continue;  // a stride never taken cannot overlap
    if (d.stride < extent)
      fail(view, ".", d.name, ": ", d.stride, " overlaps (the dimensions inside it span ", extent, " elements; ", d.count, " steps of it)");
    extent = checked_span(cat(view, ".", d.name), d.count, d.stride, extent);
  }
  return extent;
}

inline void expect_positive(std::string_view view, const char* name, index_t value) {
  if (value <= 0) fail(view, ".", name, ": must be positive, got ", value);
}

inline void expect_non_negative(std::string_view view, const char* name, std::ptrdiff_t stride) {
  if (stride < 0) fail(view, ".", name, ": must not be negative, got ", stride);
}

/// The view with packed strides filled in, checked: positive sizes, no overlap, no overflow, data set and
/// aligned. `extent` receives the elements spanned.
template <class T, memory_space Space>
qk_rows<T, Space> resolve_rows(std::string_view view, qk_rows<T, Space> r, std::ptrdiff_t& extent) {
  expect_positive(view, "batch", r.batch);
  expect_positive(view, "heads", r.heads);
  expect_positive(view, "tokens", r.tokens);
  expect_positive(view, "head_dim", r.head_dim);
  expect_non_negative(view, "token_stride", r.token_stride);
  expect_non_negative(view, "head_stride", r.head_stride);
  expect_non_negative(view, "sample_stride", r.sample_stride);
  if (r.token_stride == 0) r.token_stride = r.head_dim;
  if (r.head_stride == 0) r.head_stride = checked_product<std::ptrdiff_t>(cat(view, ".tokens * token_stride"), r.tokens, r.token_stride);
  if (r.sample_stride == 0) r.sample_stride = checked_product<std::ptrdiff_t>(cat(view, ".heads * head_stride"), r.heads, r.head_stride);
  extent = nested_extent<3>(view, {{{"token_stride", r.tokens, r.token_stride}, {"head_stride", r.heads, r.head_stride}, {"sample_stride", r.batch, r.sample_stride}}},
                            r.head_dim);
  if (r.data == nullptr) fail(view, ".data: null for ", r.batch, " x ", r.heads, " x ", r.tokens, " rows of ", r.head_dim);
  if (reinterpret_cast<std::uintptr_t>(r.data) % alignof(T) != 0) fail(view, ".data: address ", static_cast<const void*>(r.data), " is not aligned to ", alignof(T), " bytes");
  return r;
}

/// Whether two byte ranges share a byte.
inline bool overlaps(const void* a, std::size_t a_bytes, const void* b, std::size_t b_bytes) {
  const auto a0 = reinterpret_cast<std::uintptr_t>(a), b0 = reinterpret_cast<std::uintptr_t>(b);
  return a0 < b0 + b_bytes && b0 < a0 + a_bytes;
}

/// A checked, stride-resolved lse_attention and the sizes the kernels need.
template <class T, memory_space Space>
struct resolved_lse_attention {
  lse_attention<T, Space> in;
  std::ptrdiff_t query_extent = 0, key_extent = 0, lse_extent = 0;  ///< elements each view spans
  index_t out_size = 0;                                               ///< batch * keys
};

/// Every check of an LSE column-sum call that needs no look at the values (shared with the device, whose
/// values cannot be read without synchronising): shapes, strides, pointers, the scale, the output's size and
/// that it overlaps no input. `out` may be null only when `out_size` is 0 (a size query passes neither).
template <class T, memory_space Space>
resolved_lse_attention<T, Space> resolve(const lse_attention<T, Space>& in, const float* out, std::size_t out_size, bool check_out) {
  resolved_lse_attention<T, Space> r;
  r.in = in;
  r.in.queries = resolve_rows("queries", in.queries, r.query_extent);
  r.in.keys = resolve_rows("keys", in.keys, r.key_extent);
  const auto& q = r.in.queries;
  const auto& k = r.in.keys;
  if (k.batch != q.batch) fail("keys.batch: ", k.batch, " differs from queries.batch ", q.batch);
  if (k.heads != q.heads) fail("keys.heads: ", k.heads, " differs from queries.heads ", q.heads);
  if (k.head_dim != q.head_dim) fail("keys.head_dim: ", k.head_dim, " differs from queries.head_dim ", q.head_dim);
  if (!(std::isfinite(in.scale) && in.scale > 0.f)) fail("scale: the softmax scale must be finite and positive, got ", in.scale);

  auto& l = r.in.lse;
  expect_non_negative("lse", "query_stride", l.query_stride);
  expect_non_negative("lse", "head_stride", l.head_stride);
  expect_non_negative("lse", "sample_stride", l.sample_stride);
  if (l.query_stride == 0) l.query_stride = 1;
  if (l.head_stride == 0) l.head_stride = checked_product<std::ptrdiff_t>("lse: queries * query_stride", q.tokens, l.query_stride);
  if (l.sample_stride == 0) l.sample_stride = checked_product<std::ptrdiff_t>("lse: heads * head_stride", q.heads, l.head_stride);
  r.lse_extent = nested_extent<3>("lse", {{{"query_stride", q.tokens, l.query_stride}, {"head_stride", q.heads, l.head_stride}, {"sample_stride", q.batch, l.sample_stride}}}, 1);
  if (l.data == nullptr) fail("lse.data: null for ", q.batch, " x ", q.heads, " x ", q.tokens, " values");
  if (reinterpret_cast<std::uintptr_t>(l.data) % alignof(float) != 0) fail("lse.data: address ", static_cast<const void*>(l.data), " is not aligned to ", alignof(float), " bytes");

  r.out_size = checked_product<index_t>("out: batch * keys", q.batch, k.tokens);
  if (check_out) {
    expect_size("out", out_size, static_cast<std::size_t>(r.out_size));
    if (out == nullptr) fail("out: null data for ", r.out_size, " values");
    const std::size_t out_bytes = out_size * sizeof(float);
    if (overlaps(out, out_bytes, q.data, static_cast<std::size_t>(r.query_extent) * sizeof(T))) fail("out: overlaps queries.data");
    if (overlaps(out, out_bytes, k.data, static_cast<std::size_t>(r.key_extent) * sizeof(T))) fail("out: overlaps keys.data");
    if (overlaps(out, out_bytes, l.data, static_cast<std::size_t>(r.lse_extent) * sizeof(float))) fail("out: overlaps lse.data");
  }
  return r;
}

/// The subset estimate's view: every `step`-th query (0, step, 2 step, ...) of a resolved input, as a view
/// with strides `step` times as long, and the factor queries / sampled queries that scales its sums to the
/// full count. step = 1 is the exact view with factor 1.
template <class T, memory_space Space>
lse_attention<T, Space> every_nth_query(const lse_attention<T, Space>& in, index_t step, double& count_factor) {
  if (step < 1) fail("query_step: must be at least 1, got ", step);
  lse_attention<T, Space> s = in;
  const index_t all = in.queries.tokens;
  const index_t sampled = all / step + (all % step != 0 ? 1 : 0);
  s.queries.tokens = sampled;
  // Only strides that are taken get multiplied: with one sampled query they never are (and could overflow).
  if (sampled > 1) {
    s.queries.token_stride = checked_product<std::ptrdiff_t>("queries.token_stride * query_step", in.queries.token_stride, step);
    s.lse.query_stride = checked_product<std::ptrdiff_t>("lse.query_stride * query_step", in.lse.query_stride, step);
  }
  count_factor = static_cast<double>(all) / static_cast<double>(sampled);
  return s;
}

/// Host-only value checks: every query, key and LSE value in the views is finite (a NaN would turn whole
/// columns to NaN; an infinite LSE would silently zero a query's row).
template <class T>
void expect_finite_values(const lse_attention<T>& in) {
  const auto check_rows = [](std::string_view view, const qk_rows<T>& r) {
    for (index_t b = 0; b < r.batch; ++b)
      for (index_t h = 0; h < r.heads; ++h)
        for (index_t t = 0; t < r.tokens; ++t) {
          const T* row = r.row(b, h, t);
          for (index_t i = 0; i < r.head_dim; ++i) {
            const float v = storage_traits<T>::load(row[i]);
            if (!std::isfinite(v)) fail(view, "[", b, "][", h, "][", t, "][", i, "] is not finite (", v, ")");
          }
        }
  };
  check_rows("queries", in.queries);
  check_rows("keys", in.keys);
  for (index_t b = 0; b < in.queries.batch; ++b)
    for (index_t h = 0; h < in.queries.heads; ++h)
      for (index_t q = 0; q < in.queries.tokens; ++q) {
        const float v = in.lse.at(b, h, q);
        if (!std::isfinite(v)) fail("lse[", b, "][", h, "][", q, "] is not finite (", v, ")");
      }
}

/// The sums of a checked input, times `factor / heads`, into out. Each key's sum runs over heads, then
/// queries, in index order, in double: the result does not depend on how the keys are blocked.
template <class T>
void lse_column_sums_checked(const lse_attention<T>& in, double count_factor, std::span<float> out, column_mode mode) {
  constexpr index_t key_block = 16;  // keys sharing one pass over the queries (their rows stay in cache)
  const auto& q = in.queries;
  const auto& k = in.keys;
  const double scale = static_cast<double>(in.scale);
  const double factor = count_factor / static_cast<double>(q.heads);
  for (index_t b = 0; b < q.batch; ++b)
    for (index_t k0 = 0; k0 < k.tokens; k0 += key_block) {
      const index_t nk = std::min(key_block, k.tokens - k0);
      std::array<double, key_block> sum{};
      for (index_t h = 0; h < q.heads; ++h)
        for (index_t t = 0; t < q.tokens; ++t) {
          const T* qrow = q.row(b, h, t);
          const double lse = static_cast<double>(in.lse.at(b, h, t));
          for (index_t j = 0; j < nk; ++j) {
            const T* krow = k.row(b, h, k0 + j);
            double dot = 0.0;  // float products are exact in double
            for (index_t i = 0; i < q.head_dim; ++i)
              dot += static_cast<double>(storage_traits<T>::load(qrow[i])) * static_cast<double>(storage_traits<T>::load(krow[i]));
            sum[static_cast<std::size_t>(j)] += std::exp(scale * dot - lse);
          }
        }
      for (index_t j = 0; j < nk; ++j) {
        float& dst = out[static_cast<std::size_t>(b) * static_cast<std::size_t>(k.tokens) + static_cast<std::size_t>(k0 + j)];
        const float v = static_cast<float>(sum[static_cast<std::size_t>(j)] * factor);
        dst = mode == column_mode::accumulate ? dst + v : v;
      }
    }
}

}  // namespace detail

/// Exact head-averaged attention column sums of one layer from Q, K and the queries' LSE:
///   out[b * keys + k] (+)= (1 / heads) * sum_h sum_q exp(scale * q·k - lse[b][h][q]),
/// over the queries in the view (on a partial step, the C1 queries the layer computed). Sums in double,
/// in a fixed order, so results are reproducible. Every argument and value is checked before anything is
/// written (std::invalid_argument naming the parameter). Time O(batch * heads * queries * keys * head_dim);
/// no allocation. Call once per layer with column_mode::accumulate after the first for the all-layer `his`.
template <class T>
void lse_column_sums(const lse_attention<T>& in, std::span<float> out, column_mode mode) {
  const auto r = detail::resolve(in, out.data(), out.size(), true);
  detail::expect_finite_values(r.in);
  detail::lse_column_sums_checked(r.in, 1.0, out, mode);
}

/// The cheaper estimate: the same sums over queries 0, s, 2s, ... (s = query_step, ceil(queries / s) of
/// them), scaled by queries / ceil(queries / s) to the full count. Deterministic (a fixed subset), about
/// s times cheaper; docs/cuda.md gives its measured rank agreement with the exact sums. query_step = 1 is
/// lse_column_sums. Pick s coprime with the image width (odd, for power-of-two widths), so the sampled
/// queries do not line up in a few columns of the image.
template <class T>
void lse_column_sums_estimate(const lse_attention<T>& in, index_t query_step, std::span<float> out, column_mode mode) {
  const auto r = detail::resolve(in, out.data(), out.size(), true);
  double count_factor = 1.0;
  const auto sampled = detail::every_nth_query(r.in, query_step, count_factor);
  detail::expect_finite_values(r.in);  // all of it: an error names the element as the caller indexes it
  detail::lse_column_sums_checked(sampled, count_factor, out, mode);
}

/// Spearman's rank correlation of two equally long sequences of finite values: the Pearson correlation of
/// their ranks, ties given their average rank. 1 = the same order, -1 = reversed. NaN when either sequence is
/// constant (no order to agree with). Allocates: a measuring tool, not for the per-step path.
inline double spearman_correlation(std::span<const float> a, std::span<const float> b) {
  detail::expect_size("b", b.size(), a.size());
  if (a.size() < 2) detail::fail("a: rank correlation needs at least 2 values, got ", a.size());
  detail::expect_finite("a", a);
  detail::expect_finite("b", b);
  const auto ranks = [](std::span<const float> v) {
    std::vector<std::size_t> order(v.size());
    std::iota(order.begin(), order.end(), std::size_t{0});
    std::stable_sort(order.begin(), order.end(), [&](std::size_t x, std::size_t y) { return v[x] < v[y]; });
    std::vector<double> rank(v.size());
    for (std::size_t i = 0; i < order.size();) {
      std::size_t j = i;
      while (j + 1 < order.size() && v[order[j + 1]] == v[order[i]]) ++j;
      const double average = 0.5 * static_cast<double>(i + j);  // ranks i..j share their mean
      for (std::size_t m = i; m <= j; ++m) rank[order[m]] = average;
      i = j + 1;
    }
    return rank;
  };
  const auto ra = ranks(a), rb = ranks(b);
  const double mean = 0.5 * static_cast<double>(a.size() - 1);  // the mean rank, ties or not
  double sab = 0.0, saa = 0.0, sbb = 0.0;
  for (std::size_t i = 0; i < ra.size(); ++i) {
    const double x = ra[i] - mean, y = rb[i] - mean;
    sab += x * y;
    saa += x * x;
    sbb += y * y;
  }
  if (saa == 0.0 || sbb == 0.0) return std::numeric_limits<double>::quiet_NaN();
  return sab / std::sqrt(saa * sbb);
}

}  // namespace specdiff
