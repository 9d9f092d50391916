// device_cache_store: host_cache_store's layout and semantics in caller device memory. Per (layer, site),
// the last `history_depth` rows of every token in a ring, each tagged with its timestep; C2/C3 fills use the
// same approximator types as the host (their weights() are host-and-device). A batch is more tokens
// (sample b's token i is row b * tokens + i), exactly as on the host.
//
// One warp per token row: lane 0 owns the ring bookkeeping (head, count, tag), all lanes move the row, in
// 16-byte units where the matrices allow. Rows in and out are float, __half or __nv_bfloat16 (rows.cuh),
// whatever the storage: each element goes through float, and a conversion that overflows to infinity (a
// float row into a bfloat16 store, a fill into half rows) raises status_conversion_overflow. Where the host store throws on bad data, kernels raise a status bit
// and skip the row (status.cuh); rows must not repeat within one push (a plan's lists never do).
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "../approximators.hpp"
#include "../cache_store.hpp"
#include "../storage.hpp"
#include "error.cuh"
#include "plan.cuh"
#include "rows.cuh"
#include "status.cuh"
#include "views.cuh"

namespace specdiff::gpu {

/// Tuning: warps per block (one token row per warp at a time).
template <int BlockWarps = 8>
struct store_policy {
  static_assert(BlockWarps >= 1 && BlockWarps <= 32);
  static constexpr int block_warps = BlockWarps;
};

namespace detail {

/// One (layer, site) of a store, as kernels see it: pointers already offset to that slot's first token.
template <class Storage>
struct store_slot {
  Storage* data;          // [token][depth][dim]
  float* tags;            // [token][depth]
  std::uint8_t* head;     // [token]
  std::uint8_t* count;    // [token]
  std::uint32_t* status;
  index_t tokens;
  index_t dim;
  int depth;

#if defined(__CUDACC__)
  __device__ int slot(index_t token, int k) const { return (head[token] - k + depth) % depth; }
  __device__ Storage* entry(index_t token, int s) const {
    return data + (static_cast<std::ptrdiff_t>(token) * depth + s) * static_cast<std::ptrdiff_t>(dim);
  }
#endif
};

/// Elements each lane moves per 16-byte round: whole 16-byte units of both the row type and the storage.
template <class Row, class Storage>
inline constexpr int vec_elems = unit_elems<Row> > unit_elems<Storage> ? unit_elems<Row> : unit_elems<Storage>;

#if defined(__CUDACC__)
/// Pushes one new history entry for each listed token, from `src`: compact rows (row b * capacity + r) or,
/// with Compact false, the token's own row of a full matrix.
template <class Policy, class Storage, class Row, bool Vector, bool Compact, class Rows>
__global__ void __launch_bounds__(32 * Policy::block_warps)
    push_kernel(store_slot<Storage> s, float t, const Row* src, std::ptrdiff_t src_stride, Rows rows, index_t capacity) {
  constexpr int warps = Policy::block_warps, V = vec_elems<Row, Storage>;
  const int lane = static_cast<int>(threadIdx.x % 32), warp = static_cast<int>(threadIdx.x / 32);
  const index_t b = blockIdx.y;
  const index_t n = clamped_size(rows, b, capacity, s.status);
  for (index_t r = blockIdx.x * warps + warp; r < n; r += gridDim.x * warps) {  // warp-uniform
    const index_t token = rows.row(b, r);
    if (token < 0 || token >= s.tokens) {
      if (lane == 0) raise_status(s.status, status_index_out_of_range);
      continue;
    }
    int held = 0, next = 0;
    if (lane == 0) {
      held = s.count[token];
      next = held == 0 ? 0 : (s.head[token] + 1) % s.depth;
    }
    next = __shfl_sync(0xffffffffu, next, 0);
    const Row* in = src + (Compact ? static_cast<std::ptrdiff_t>(b) * capacity + r : token) * src_stride;
    Storage* out = s.entry(token, next);
    bool bad = false, overflow = false;
    if constexpr (Vector) {
      for (index_t c = lane * V; c < s.dim; c += 32 * V) {
        float x[V];
        load_vec<Row, V>(in + c, x);
#pragma unroll
        for (int i = 0; i < V; ++i) bad |= !isfinite(x[i]);
        store_vec<Storage, V>(out + c, x, overflow);
      }
    } else {
      for (index_t c = lane; c < s.dim; c += 32) {
        const float x = element_access<Row>::load(in[c]);
        bad |= !isfinite(x);
        out[c] = convert_checked<Storage>(x, overflow);
      }
    }
    const bool any_bad = __any_sync(0xffffffffu, bad), any_overflow = __any_sync(0xffffffffu, overflow);
    if (lane == 0 && any_bad) raise_status(s.status, status_nonfinite_feature);
    if (lane == 0 && any_overflow) raise_status(s.status, status_conversion_overflow);
    if (lane == 0) {
      s.tags[static_cast<std::ptrdiff_t>(token) * s.depth + next] = t;
      s.head[token] = static_cast<std::uint8_t>(next);
      s.count[token] = static_cast<std::uint8_t>(held < s.depth ? held + 1 : s.depth);
    }
  }
}

/// Writes each listed token's row of `out` with the approximator's mix of its history at timestep t,
/// accumulating w_k * x_k in the host's order without fused multiply-adds, so that equal weights give
/// bit-equal rows.
template <class Policy, class Storage, class Row, bool Vector, class A, class Rows>
__global__ void __launch_bounds__(32 * Policy::block_warps)
    fill_kernel(store_slot<Storage> s, float t, A approx, Row* out, std::ptrdiff_t out_stride, Rows rows, index_t capacity) {
  constexpr int warps = Policy::block_warps, V = vec_elems<Row, Storage>, D = A::depth;
  const int lane = static_cast<int>(threadIdx.x % 32), warp = static_cast<int>(threadIdx.x / 32);
  const index_t b = blockIdx.y;
  const index_t n = clamped_size(rows, b, capacity, s.status);
  for (index_t r = blockIdx.x * warps + warp; r < n; r += gridDim.x * warps) {
    const index_t token = rows.row(b, r);
    if (token < 0 || token >= s.tokens) {
      if (lane == 0) raise_status(s.status, status_index_out_of_range);
      continue;
    }
    const int held = s.count[token] < D ? s.count[token] : D;
    if (held == 0) {
      if (lane == 0) raise_status(s.status, status_empty_history);
      continue;
    }
    float tags[D], w[D];
    const Storage* src[D];
#pragma unroll
    for (int k = 0; k < D; ++k) {
      const int slot = k < held ? s.slot(token, k) : 0;
      tags[k] = s.tags[static_cast<std::ptrdiff_t>(token) * s.depth + slot];
      src[k] = s.entry(token, slot);
      w[k] = 0.f;
    }
    if (approx.weights(tags, held, t, w) != held) {
      if (lane == 0) raise_status(s.status, status_rejected_tags);
      continue;
    }
    Row* o = out + static_cast<std::ptrdiff_t>(token) * out_stride;
    bool overflow = false;
    if constexpr (Vector) {
      for (index_t c = lane * V; c < s.dim; c += 32 * V) {
        float acc[V] = {};
#pragma unroll
        for (int k = 0; k < D; ++k) {
          if (k >= held) break;
          float x[V];
          load_vec<Storage, V>(src[k] + c, x);
#pragma unroll
          for (int i = 0; i < V; ++i) acc[i] = __fadd_rn(acc[i], __fmul_rn(w[k], x[i]));
        }
        store_vec<Row, V>(o + c, acc, overflow);
      }
    } else {
      for (index_t c = lane; c < s.dim; c += 32) {
        float acc = 0.f;
#pragma unroll
        for (int k = 0; k < D; ++k)
          if (k < held) acc = __fadd_rn(acc, __fmul_rn(w[k], storage_traits<Storage>::load(src[k][c])));
        o[c] = convert_checked<Row>(acc, overflow);
      }
    }
    if (__any_sync(0xffffffffu, overflow) && lane == 0) raise_status(s.status, status_conversion_overflow);
  }
}

/// Per token, the L2 norm of latest - previous row (double accumulation), +inf with fewer than two rows.
template <class Policy, class Storage>
__global__ void __launch_bounds__(32 * Policy::block_warps) change_norm_kernel(store_slot<Storage> s, float* out) {
  constexpr int warps = Policy::block_warps;
  const int lane = static_cast<int>(threadIdx.x % 32), warp = static_cast<int>(threadIdx.x / 32);
  for (index_t token = blockIdx.x * warps + warp; token < s.tokens; token += gridDim.x * warps) {
    if (s.count[token] < 2) {
      if (lane == 0) out[token] = INFINITY;
      continue;
    }
    const Storage* a = s.entry(token, s.slot(token, 0));
    const Storage* p = s.entry(token, s.slot(token, 1));
    double sum = 0.0;
    for (index_t c = lane; c < s.dim; c += 32) {
      const double d = static_cast<double>(storage_traits<Storage>::load(a[c])) - static_cast<double>(storage_traits<Storage>::load(p[c]));
      sum += d * d;
    }
    for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
    if (lane == 0) out[token] = static_cast<float>(sqrt(sum));
  }
}
#endif

}  // namespace detail

template <storage_type Storage = float, class Policy = store_policy<>>
class device_cache_store {
 public:
  using storage = Storage;

  /// Bytes of device memory a store of this shape needs (256-byte aligned memory, as cudaMalloc returns).
  static std::size_t memory_bytes(const cache_shape& shape) {
    shape.validate();
    return layout(shape).total;
  }

  /// A store over caller memory; enqueues clear() on `stream` (no host synchronisation).
  device_cache_store(cache_shape shape, void* memory, std::size_t bytes, cudaStream_t stream) : shape_((shape.validate(), shape)) {
    const offsets o = layout(shape_);
    detail::expect_memory("memory", memory, bytes, o.total);
    auto* base = static_cast<unsigned char*>(memory);
    data_ = reinterpret_cast<Storage*>(base + o.data);
    tags_ = reinterpret_cast<float*>(base + o.tags);
    head_ = base + o.head;
    count_ = base + o.count;
    status_ = reinterpret_cast<std::uint32_t*>(base + o.status);
    bytes_ = o.total;
    clear(stream);
  }

  const cache_shape& shape() const { return shape_; }
  std::size_t memory_bytes() const { return bytes_; }
  /// The device status word (status.cuh bits); read_status() waits for the stream and returns it.
  std::uint32_t* status() const { return status_; }
  std::uint32_t read_status(cudaStream_t stream) const { return gpu::read_status(status_, stream); }
  /// Throws std::runtime_error naming the raised status bits (synchronises).
  void check_status(cudaStream_t stream) const { throw_if_status(read_status(stream), "device_cache_store"); }

  /// Forgets every row (a new image) and clears the status word; keeps the memory.
  void clear(cudaStream_t stream) {
    const std::size_t rows = row_count();
    SPECDIFF_CUDA_CHECK(cudaMemsetAsync(count_, 0, rows, stream));
    SPECDIFF_CUDA_CHECK(cudaMemsetAsync(head_, 0, rows, stream));
    SPECDIFF_CUDA_CHECK(cudaMemsetAsync(status_, 0, sizeof(std::uint32_t), stream));
  }

#if defined(__CUDACC__)
  // Rows are device_matrix<R> of a row_element (float, __half, __nv_bfloat16), const or not: the row type
  // is deduced, so float callers read as before and bf16 engines pass their tensors directly.

  /// Pushes a new entry for every token: rows[i] is token i.
  template <class R>
    requires row_element<std::remove_const_t<R>>
  void write(index_t layer, index_t site, float t, device_matrix<R> rows, cudaStream_t stream) {
    detail::expect_matrix("rows", rows, shape_.tokens, shape_.dim);
    push<false>(layer, site, t, all_rows{shape_.tokens}, const_rows(rows), stream);
  }

  /// Pushes a new entry for each listed token from compact rows (sample b's r-th at row b * capacity + r):
  /// what a partial forward produces.
  template <class Rows, class R>
    requires row_element<std::remove_const_t<R>>
  void scatter(index_t layer, index_t site, float t, const Rows& tokens, device_matrix<R> rows, cudaStream_t stream) {
    tokens.validate();
    const long long need = static_cast<long long>(tokens.samples()) * tokens.capacity();
    if (rows.rows < need) detail::fail("rows: ", rows.rows, " rows, the token set needs ", tokens.samples(), " x ", tokens.capacity(), " = ", need);
    detail::expect_matrix("rows", rows, rows.rows, shape_.dim);
    push<true>(layer, site, t, tokens, const_rows(rows), stream);
  }

  /// Pushes a new entry for each listed token, read in place from a full matrix (row `token` of `all`).
  template <class Rows, class R>
    requires row_element<std::remove_const_t<R>>
  void write_rows(index_t layer, index_t site, float t, const Rows& tokens, device_matrix<R> all, cudaStream_t stream) {
    tokens.validate();
    detail::expect_matrix("all", all, shape_.tokens, shape_.dim);
    push<false>(layer, site, t, tokens, const_rows(all), stream);
  }

  /// For each listed token, writes its row of `out` (tokens x dim) with the approximator's mix of the
  /// token's history at timestep t.
  template <approximator A, class Rows, row_element R>
  void fill(index_t layer, index_t site, float t, const Rows& tokens, const A& approx, device_matrix<R> out, cudaStream_t stream) const {
    tokens.validate();
    expect_common(layer, site, t, tokens);
    detail::expect_matrix("out", out, shape_.tokens, shape_.dim);
    if (tokens.capacity() == 0) return;
    const auto s = slot(layer, site);
    const dim3 grid = rows_grid(tokens);
    if (vector_rows(out)) {
      detail::fill_kernel<Policy, Storage, R, true, A, Rows><<<grid, threads, 0, stream>>>(s, t, approx, out.data, out.stride, tokens, tokens.capacity());
    } else {
      detail::fill_kernel<Policy, Storage, R, false, A, Rows><<<grid, threads, 0, stream>>>(s, t, approx, out.data, out.stride, tokens, tokens.capacity());
    }
    SPECDIFF_CUDA_CHECK_LAUNCH("fill_kernel");
  }

  /// C2: each listed token's latest cached row, unchanged (as host_cache_store::fill without an
  /// approximator; `t` is checked but not read).
  template <class Rows, row_element R>
  void fill(index_t layer, index_t site, float t, const Rows& tokens, device_matrix<R> out, cudaStream_t stream) const {
    fill(layer, site, t, tokens, latest{}, out, stream);
  }

  /// Per token, the L2 norm of (latest - previous) row; +inf where fewer than two rows are cached.
  void change_norm(index_t layer, index_t site, device_span<float> out, cudaStream_t stream) const {
    expect_layer_site(layer, site);
    detail::expect_span("out", out, shape_.tokens);
    detail::change_norm_kernel<Policy, Storage>
        <<<detail::blocks_for(static_cast<std::size_t>(shape_.tokens), Policy::block_warps), threads, 0, stream>>>(slot(layer, site), out.data);
    SPECDIFF_CUDA_CHECK_LAUNCH("change_norm_kernel");
  }
#endif

 private:
  static constexpr int threads = 32 * Policy::block_warps;

  struct offsets {
    std::size_t data, tags, head, count, status, total;
  };
  static offsets layout(const cache_shape& s) {
    const std::size_t rows = static_cast<std::size_t>(s.layers) * static_cast<std::size_t>(s.sites) * static_cast<std::size_t>(s.tokens);
    const std::size_t entries = rows * static_cast<std::size_t>(s.history_depth);
    detail::workspace_layout l;
    offsets o{};
    o.data = l.add(entries * static_cast<std::size_t>(s.dim) * sizeof(Storage));
    o.tags = l.add(entries * sizeof(float));
    o.head = l.add(rows);
    o.count = l.add(rows);
    o.status = l.add(sizeof(std::uint32_t));
    o.total = l.bytes();
    return o;
  }

  std::size_t row_count() const {
    return static_cast<std::size_t>(shape_.layers) * static_cast<std::size_t>(shape_.sites) * static_cast<std::size_t>(shape_.tokens);
  }

  void expect_layer_site(index_t layer, index_t site) const {
    specdiff::detail::expect_index("layer", layer, shape_.layers);
    specdiff::detail::expect_index("site", site, shape_.sites);
  }

  template <class Rows>
  void expect_common(index_t layer, index_t site, float t, const Rows& tokens) const {
    expect_layer_site(layer, site);
    if (!std::isfinite(t)) detail::fail("t: timestep is not finite (", t, ")");
    if (tokens.extent() != shape_.tokens)
      detail::fail("tokens: the row set addresses ", tokens.extent(), " rows, the store holds ", shape_.tokens, " tokens");
    if (tokens.samples() > 65535) detail::fail("tokens: ", tokens.samples(), " samples exceed 65535");
  }

  detail::store_slot<Storage> slot(index_t layer, index_t site) const {
    const std::size_t first = (static_cast<std::size_t>(layer) * static_cast<std::size_t>(shape_.sites) + static_cast<std::size_t>(site)) *
                              static_cast<std::size_t>(shape_.tokens);
    const auto depth = static_cast<std::size_t>(shape_.history_depth);
    return {data_ + first * depth * static_cast<std::size_t>(shape_.dim), tags_ + first * depth, head_ + first, count_ + first, status_,
            shape_.tokens, shape_.dim, shape_.history_depth};
  }

  // 16-byte units along a row: the store's own rows are aligned when dim fills whole units of both types.
  template <class R>
  bool vector_rows(const device_matrix<R>& m) const {
    return shape_.dim % detail::vec_elems<std::remove_const_t<R>, Storage> == 0 && detail::vectorisable(m);
  }

  template <class R>
  static device_matrix<const std::remove_const_t<R>> const_rows(device_matrix<R> m) {
    return m;
  }

  template <class Rows>
  dim3 rows_grid(const Rows& tokens) const {
    return {detail::blocks_for(static_cast<std::size_t>(tokens.capacity()), Policy::block_warps), static_cast<unsigned>(tokens.samples())};
  }

#if defined(__CUDACC__)
  template <bool Compact, class Rows, class R>
  void push(index_t layer, index_t site, float t, const Rows& tokens, device_matrix<const R> src, cudaStream_t stream) {
    expect_common(layer, site, t, tokens);
    if (tokens.capacity() == 0) return;
    const auto s = slot(layer, site);
    const dim3 grid = rows_grid(tokens);
    if (vector_rows(src)) {
      detail::push_kernel<Policy, Storage, R, true, Compact, Rows><<<grid, threads, 0, stream>>>(s, t, src.data, src.stride, tokens, tokens.capacity());
    } else {
      detail::push_kernel<Policy, Storage, R, false, Compact, Rows><<<grid, threads, 0, stream>>>(s, t, src.data, src.stride, tokens, tokens.capacity());
    }
    SPECDIFF_CUDA_CHECK_LAUNCH("push_kernel");
  }
#endif

  cache_shape shape_;
  Storage* data_ = nullptr;
  float* tags_ = nullptr;
  std::uint8_t* head_ = nullptr;
  std::uint8_t* count_ = nullptr;
  std::uint32_t* status_ = nullptr;
  std::size_t bytes_ = 0;
};

}  // namespace specdiff::gpu
