// Test support for the CUDA suites: device buffers, fresh seeded randomness, error-message checks, and
// moving token plans between host and device layouts.
#pragma once

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <initializer_list>
#include <random>
#include <string>
#include <vector>

#include <specdiff/cuda/specdiff.cuh>
#include <specdiff/specdiff.hpp>

#include "../common/testing.hpp"

namespace cudatest {

using specdiff::index_t;

using testing::expect_error;
inline std::uint64_t seed() { return testing::fresh_seed(); }
inline std::mt19937_64 rng(std::uint64_t salt) { return testing::rng(salt); }

/// Device memory for n values of T (tests only: the library itself never allocates).
template <class T>
class buffer {
 public:
  buffer() = default;
  explicit buffer(std::size_t n) : n_(n) { SPECDIFF_CUDA_CHECK(cudaMalloc(&p_, bytes() ? bytes() : 1)); }
  explicit buffer(const std::vector<T>& host) : buffer(host.size()) { upload(host); }
  buffer(const buffer&) = delete;
  buffer& operator=(const buffer&) = delete;
  buffer(buffer&& o) noexcept : p_(o.p_), n_(o.n_) { o.p_ = nullptr, o.n_ = 0; }
  buffer& operator=(buffer&& o) noexcept {
    std::swap(p_, o.p_);
    std::swap(n_, o.n_);
    return *this;
  }
  ~buffer() {
    if (p_) cudaFree(p_);
  }

  T* get() const { return p_; }
  std::size_t size() const { return n_; }
  std::size_t bytes() const { return n_ * sizeof(T); }
  specdiff::gpu::device_span<T> span() const { return {p_, static_cast<index_t>(n_)}; }
  specdiff::gpu::device_span<const T> cspan() const { return {p_, static_cast<index_t>(n_)}; }

  void upload(const std::vector<T>& host) {
    REQUIRE(host.size() == n_);
    SPECDIFF_CUDA_CHECK(cudaMemcpy(p_, host.data(), bytes(), cudaMemcpyHostToDevice));
    SPECDIFF_CUDA_CHECK(cudaDeviceSynchronize());  // pageable copies may return before the DMA lands
  }
  std::vector<T> download() const {
    std::vector<T> host(n_);
    SPECDIFF_CUDA_CHECK(cudaDeviceSynchronize());
    SPECDIFF_CUDA_CHECK(cudaMemcpy(host.data(), p_, bytes(), cudaMemcpyDeviceToHost));
    return host;
  }

 private:
  T* p_ = nullptr;
  std::size_t n_ = 0;
};

struct stream {
  cudaStream_t s = nullptr;
  // A blocking stream: it orders after the legacy default stream the helpers' plain copies use.
  stream() { SPECDIFF_CUDA_CHECK(cudaStreamCreate(&s)); }
  stream(const stream&) = delete;
  stream& operator=(const stream&) = delete;
  ~stream() { cudaStreamDestroy(s); }
  operator cudaStream_t() const { return s; }
  void sync() const { SPECDIFF_CUDA_CHECK(cudaStreamSynchronize(s)); }
};

/// Device memory holding a plan for batch x tokens.
struct device_plan {
  buffer<unsigned char> memory;
  specdiff::gpu::device_plan_view view;
  device_plan(index_t batch, index_t tokens)
      : memory(specdiff::gpu::device_plan_view::bytes(batch, tokens)),
        view(specdiff::gpu::device_plan_view::carve(memory.get(), memory.size(), batch, tokens)) {
    SPECDIFF_CUDA_CHECK(cudaMemset(memory.get(), 0, memory.size()));
    SPECDIFF_CUDA_CHECK(cudaDeviceSynchronize());
  }
};

/// A device plan's contents, downloaded.
struct plan_copy {
  std::vector<index_t> order, counts;
  std::vector<specdiff::level> levels;
  std::uint32_t status = 0;
};

inline plan_copy download(const specdiff::gpu::device_plan_view& p) {
  SPECDIFF_CUDA_CHECK(cudaDeviceSynchronize());
  plan_copy c;
  const auto n = static_cast<std::size_t>(p.batch) * static_cast<std::size_t>(p.tokens);
  c.order.resize(n);
  c.levels.resize(n);
  c.counts.resize(static_cast<std::size_t>(p.batch) * specdiff::level_count);
  SPECDIFF_CUDA_CHECK(cudaMemcpy(c.order.data(), p.order, n * sizeof(index_t), cudaMemcpyDeviceToHost));
  SPECDIFF_CUDA_CHECK(cudaMemcpy(c.levels.data(), p.levels, n * sizeof(specdiff::level), cudaMemcpyDeviceToHost));
  SPECDIFF_CUDA_CHECK(cudaMemcpy(c.counts.data(), p.counts, c.counts.size() * sizeof(index_t), cudaMemcpyDeviceToHost));
  SPECDIFF_CUDA_CHECK(cudaMemcpy(&c.status, p.status, sizeof c.status, cudaMemcpyDeviceToHost));
  return c;
}

/// Writes host plans (one per sample) into a device plan: the row-set tests use plans that do not depend
/// on the device classifier.
inline void upload(const std::vector<specdiff::token_plan>& plans, const specdiff::gpu::device_plan_view& p) {
  REQUIRE(static_cast<index_t>(plans.size()) == p.batch);
  std::vector<index_t> order, counts;
  std::vector<specdiff::level> levels;
  for (const auto& plan : plans) {
    REQUIRE(plan.tokens() == p.tokens);
    for (int l = 0; l < specdiff::level_count; ++l) {
      const auto idx = plan.indices(static_cast<specdiff::level>(l));
      order.insert(order.end(), idx.begin(), idx.end());
      counts.push_back(static_cast<index_t>(idx.size()));
    }
    levels.insert(levels.end(), plan.levels().begin(), plan.levels().end());
  }
  SPECDIFF_CUDA_CHECK(cudaMemcpy(p.order, order.data(), order.size() * sizeof(index_t), cudaMemcpyHostToDevice));
  SPECDIFF_CUDA_CHECK(cudaMemcpy(p.counts, counts.data(), counts.size() * sizeof(index_t), cudaMemcpyHostToDevice));
  SPECDIFF_CUDA_CHECK(cudaMemcpy(p.levels, levels.data(), levels.size() * sizeof(specdiff::level), cudaMemcpyHostToDevice));
  SPECDIFF_CUDA_CHECK(cudaMemset(p.status, 0, sizeof(std::uint32_t)));
  SPECDIFF_CUDA_CHECK(cudaDeviceSynchronize());
}

/// A random plan with every level present in some proportion (levels drawn per token, then committed).
inline specdiff::token_plan random_plan(std::mt19937_64& g, index_t tokens) {
  specdiff::token_plan plan(tokens);
  std::uniform_int_distribution<int> pick(0, specdiff::level_count - 1);
  for (auto& l : plan.mutable_levels()) l = static_cast<specdiff::level>(pick(g));
  plan.commit_levels();
  return plan;
}

// --- random inputs ----------------------------------------------------------------------------------

inline std::vector<float> lognormal(std::mt19937_64& g, std::size_t n, double zero_share) {
  std::normal_distribution<float> d(-3.f, 2.f);
  std::bernoulli_distribution zero(zero_share);
  std::vector<float> v(n);
  for (auto& x : v) x = zero(g) ? 0.f : std::exp(d(g));
  return v;
}

inline std::vector<float> counts(std::mt19937_64& g, std::size_t n, int most) {
  std::uniform_int_distribution<int> d(0, most);
  std::vector<float> v(n);
  for (auto& x : v) x = static_cast<float>(d(g));
  return v;
}

enum class scores_kind { continuous, ties, signals, wide, constant };

inline std::vector<float> make_scores(scores_kind kind, std::mt19937_64& g, std::size_t n) {
  std::normal_distribution<float> d(0.f, 3.f);
  std::vector<float> v(n);
  switch (kind) {
    case scores_kind::continuous:
      for (auto& x : v) x = d(g);
      break;
    case scores_kind::ties:  // few distinct values, both zeros among them
      for (std::size_t i = 0; i < n; ++i) v[i] = i % 5 == 0 ? (i % 10 == 0 ? -0.f : 0.f) : std::round(d(g)) * 0.5f;
      break;
    case scores_kind::signals: {  // what the SpecDiff scorer produces: log his + log fut + cf
      const auto his = lognormal(g, n, 0.02), fut = lognormal(g, n, 0.02), cf = counts(g, n, 6);
      for (std::size_t i = 0; i < n; ++i) v[i] = specdiff::math::log_score(his[i], fut[i], cf[i], 1.f);
      break;
    }
    case scores_kind::wide:  // shares that underflow to exactly zero
      for (std::size_t i = 0; i < n; ++i) v[i] = i % 3 == 0 ? -1000.f - static_cast<float>(i % 17) : d(g);
      break;
    case scores_kind::constant:
      std::fill(v.begin(), v.end(), 1.5f);
      break;
  }
  return v;
}

}  // namespace cudatest
