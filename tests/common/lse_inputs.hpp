// Attention layers for the LSE column-sum tests (core and CUDA suites): random Q and K, optionally with the
// structure of a DiT's image attention (2-D locality, a few "hot" keys every query looks at), context keys
// that take part in the softmax but are not summed (joint attention), the queries' LSE, and an independent
// reference that materialises the softmax probabilities and sums their columns.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <iterator>
#include <numeric>
#include <random>
#include <vector>

#include <specdiff/attention.hpp>
#include <specdiff/storage.hpp>

namespace lsetest {

using specdiff::index_t;

/// One attention layer, packed [batch][heads][tokens][dim], values exactly representable in the element type
/// the test feeds (bfloat16 layers are rounded once, here, so every consumer sees the same numbers).
struct layer {
  index_t batch = 1, heads = 1, queries = 0, keys = 0, context = 0, dim = 0;
  float scale = 0.f;
  std::vector<float> q;    ///< [batch][heads][queries][dim]
  std::vector<float> k;    ///< [batch][heads][keys][dim]: the image keys, whose received attention is summed
  std::vector<float> kc;   ///< [batch][heads][context][dim]: context keys, in the softmax only
  std::vector<float> lse;  ///< [batch][heads][queries]: natural log of each query's softmax normaliser

  std::size_t q_at(index_t b, index_t h, index_t t) const { return ((static_cast<std::size_t>(b) * static_cast<std::size_t>(heads) + static_cast<std::size_t>(h)) * static_cast<std::size_t>(queries) + static_cast<std::size_t>(t)) * static_cast<std::size_t>(dim); }
  std::size_t k_at(index_t b, index_t h, index_t t) const { return ((static_cast<std::size_t>(b) * static_cast<std::size_t>(heads) + static_cast<std::size_t>(h)) * static_cast<std::size_t>(keys) + static_cast<std::size_t>(t)) * static_cast<std::size_t>(dim); }
  std::size_t kc_at(index_t b, index_t h, index_t t) const { return ((static_cast<std::size_t>(b) * static_cast<std::size_t>(heads) + static_cast<std::size_t>(h)) * static_cast<std::size_t>(context) + static_cast<std::size_t>(t)) * static_cast<std::size_t>(dim); }
  std::size_t lse_at(index_t b, index_t h, index_t t) const { return (static_cast<std::size_t>(b) * static_cast<std::size_t>(heads) + static_cast<std::size_t>(h)) * static_cast<std::size_t>(queries) + static_cast<std::size_t>(t); }

  /// The packed views of this layer's host vectors (T = float; see as<T> for other element types).
  specdiff::lse_attention<float> view() const {
    return {{q.data(), batch, heads, queries, dim}, {k.data(), batch, heads, keys, dim}, {lse.data()}, scale};
  }
};

/// The DiT-like structure of `structured` layers: queries and keys are image tokens on a side x side grid in
/// raster order (queries = keys = side^2); every head adds a 2-D sin-cos position code to both (nearby tokens
/// attend to each other) and a shared direction to every query and to a few hot keys (salient tokens).
struct structure {
  index_t side = 0;          ///< 0: no structure, plain Gaussian Q and K
  float locality = 1.f;      ///< weight of the position code
  double hot_share = 0.02;   ///< share of keys that are hot
  float hot_weight = 0.5f;   ///< weight of the shared direction in hot keys and in queries
};

inline double logit(const layer& L, const float* a, const float* b) {
  double dot = 0.0;
  for (index_t i = 0; i < L.dim; ++i) dot += static_cast<double>(a[i]) * static_cast<double>(b[i]);
  return static_cast<double>(L.scale) * dot;
}

/// Recomputes the LSE of every query from Q, K and the context keys, in double (stored as float).
inline void compute_lse(layer& L) {
  L.lse.assign(static_cast<std::size_t>(L.batch * L.heads * L.queries), 0.f);
  std::vector<double> s(static_cast<std::size_t>(L.keys + L.context));
  for (index_t b = 0; b < L.batch; ++b)
    for (index_t h = 0; h < L.heads; ++h)
      for (index_t t = 0; t < L.queries; ++t) {
        const float* qr = &L.q[L.q_at(b, h, t)];
        for (index_t k = 0; k < L.keys; ++k) s[static_cast<std::size_t>(k)] = logit(L, qr, &L.k[L.k_at(b, h, k)]);
        for (index_t c = 0; c < L.context; ++c) s[static_cast<std::size_t>(L.keys + c)] = logit(L, qr, &L.kc[L.kc_at(b, h, c)]);
        const double m = *std::max_element(s.begin(), s.end());
        double sum = 0.0;
        for (double x : s) sum += std::exp(x - m);
        L.lse[L.lse_at(b, h, t)] = static_cast<float>(m + std::log(sum));
      }
}

/// Rounds Q and K to bfloat16 values (then recomputes the LSE from the rounded values).
inline void round_to_bfloat16(layer& L) {
  for (auto* v : {&L.q, &L.k, &L.kc})
    for (auto& x : *v) x = specdiff::storage_traits<specdiff::bfloat16>::load(specdiff::storage_traits<specdiff::bfloat16>::store(x));
  compute_lse(L);
}

/// A random layer. Gaussian content; with `s.side`, the DiT-like structure described above.
inline layer random_layer(std::mt19937_64& g, index_t batch, index_t heads, index_t queries, index_t keys, index_t context, index_t dim,
                          const structure& s = {}) {
  layer L;
  L.batch = batch, L.heads = heads, L.queries = queries, L.keys = keys, L.context = context, L.dim = dim;
  L.scale = 1.f / std::sqrt(static_cast<float>(dim));
  std::normal_distribution<float> normal(0.f, 1.f);
  const auto fill = [&](std::vector<float>& v, std::size_t n) {
    v.resize(n);
    for (auto& x : v) x = normal(g);
  };
  fill(L.q, static_cast<std::size_t>(batch * heads * queries * dim));
  fill(L.k, static_cast<std::size_t>(batch * heads * keys * dim));
  fill(L.kc, static_cast<std::size_t>(batch * heads * context * dim));
  if (s.side > 0) {
    // Position code: frequencies 2^-f over dims in groups of four (sin x, cos x, sin y, cos y); its dot
    // product between two tokens is a sum of cos(w dx) + cos(w dy), largest for neighbours.
    const auto add_position = [&](float* row, index_t token) {
      const float x = static_cast<float>(token % s.side), y = static_cast<float>(token / s.side);
      for (index_t i = 0; i + 3 < dim; i += 4) {
        const float w = std::ldexp(1.f, -static_cast<int>(i / 4) % 6);
        row[i] += s.locality * std::sin(w * x), row[i + 1] += s.locality * std::cos(w * x);
        row[i + 2] += s.locality * std::sin(w * y), row[i + 3] += s.locality * std::cos(w * y);
      }
    };
    std::bernoulli_distribution hot(s.hot_share);
    std::vector<float> direction(static_cast<std::size_t>(dim));
    for (index_t b = 0; b < batch; ++b)
      for (index_t h = 0; h < heads; ++h) {
        for (auto& x : direction) x = normal(g);
        for (index_t t = 0; t < queries; ++t) {
          float* row = &L.q[L.q_at(b, h, t)];
          add_position(row, t);
          for (index_t i = 0; i < dim; ++i) row[i] += s.hot_weight * direction[static_cast<std::size_t>(i)];
        }
        for (index_t t = 0; t < keys; ++t) {
          float* row = &L.k[L.k_at(b, h, t)];
          add_position(row, t);
          if (hot(g))
            for (index_t i = 0; i < dim; ++i) row[i] += s.hot_weight * direction[static_cast<std::size_t>(i)];
        }
      }
  }
  compute_lse(L);
  return L;
}

/// The independent reference: each query's softmax over [image keys; context keys] materialised in double
/// (max subtracted), columns of the image keys summed over the listed queries (all when empty) and heads,
/// divided by heads. [batch][keys].
inline std::vector<double> reference_column_sums(const layer& L, const std::vector<index_t>& query_subset = {}) {
  std::vector<index_t> rows = query_subset;
  if (rows.empty()) {
    rows.resize(static_cast<std::size_t>(L.queries));
    std::iota(rows.begin(), rows.end(), index_t{0});
  }
  std::vector<double> out(static_cast<std::size_t>(L.batch * L.keys), 0.0), s(static_cast<std::size_t>(L.keys + L.context));
  for (index_t b = 0; b < L.batch; ++b)
    for (index_t h = 0; h < L.heads; ++h)
      for (index_t t : rows) {
        const float* qr = &L.q[L.q_at(b, h, t)];
        for (index_t k = 0; k < L.keys; ++k) s[static_cast<std::size_t>(k)] = logit(L, qr, &L.k[L.k_at(b, h, k)]);
        for (index_t c = 0; c < L.context; ++c) s[static_cast<std::size_t>(L.keys + c)] = logit(L, qr, &L.kc[L.kc_at(b, h, c)]);
        const double m = *std::max_element(s.begin(), s.end());
        double z = 0.0;
        for (double x : s) z += std::exp(x - m);
        for (index_t k = 0; k < L.keys; ++k) out[static_cast<std::size_t>(b * L.keys + k)] += std::exp(s[static_cast<std::size_t>(k)] - m) / z / L.heads;
      }
  return out;
}

/// Values converted to element type T (exact for a layer rounded to that type).
template <class T>
std::vector<T> as(const std::vector<float>& v) {
  std::vector<T> out(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) out[i] = specdiff::storage_traits<T>::store(v[i]);
  return out;
}

/// Share of the `count` largest values of `exact` that are also among the `count` largest of `estimate` (ties
/// broken by index): how much of the set a top-k classifier picks survives the estimate.
inline double top_overlap(const std::vector<float>& exact, const std::vector<float>& estimate, std::size_t count) {
  const auto top = [count](const std::vector<float>& v) {
    std::vector<std::size_t> idx(v.size());
    std::iota(idx.begin(), idx.end(), std::size_t{0});
    std::stable_sort(idx.begin(), idx.end(), [&](std::size_t a, std::size_t b) { return v[a] > v[b]; });
    idx.resize(count);
    std::sort(idx.begin(), idx.end());
    return idx;
  };
  const auto a = top(exact), b = top(estimate);
  std::vector<std::size_t> both;
  std::set_intersection(a.begin(), a.end(), b.begin(), b.end(), std::back_inserter(both));
  return static_cast<double>(both.size()) / static_cast<double>(count);
}

}  // namespace lsetest
