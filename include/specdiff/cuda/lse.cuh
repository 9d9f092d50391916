// Attention received per key on the device, exactly, from Q, K and the LSE a flash-attention kernel returns
// (the host twin and the formula: <specdiff/attention.hpp>):
//   his[b][k] (+)= (1 / heads) * sum_h sum_q exp(scale * q·k - lse[b][h][q]).
// Tiled like the attention that produced the LSE: a block recomputes a 64 x 64 tile of logits at a time in
// registers (K and Q staged through shared memory), exponentiates it against the queries' LSE and adds it
// to per-key running sums, so memory stays O(keys), never O(queries x keys). Two kernels, as for the
// probability column sums (attention.cuh): partial sums per (key tile, chunk of query tiles) in double,
// then, per key, the chunks in a fixed order. No atomics: results are bit-identical from run to run.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "../attention.hpp"
#include "../common.hpp"
#include "../storage.hpp"
#include "attention.cuh"
#include "error.cuh"
#include "rows.cuh"
#include "views.cuh"

namespace specdiff::gpu {

/// The host views in device memory: distinct types, so a host pointer is not passed by accident.
template <class T>
using device_qk_rows = qk_rows<T, memory_space::device>;
using device_lse_values = lse_values<memory_space::device>;
template <class T>
using device_lse_attention = lse_attention<T, memory_space::device>;

/// Tuning: query tiles (of 64 queries of one head) summed into one partial per key, and the slice of
/// head_dim staged through shared memory at a time. More tiles per chunk: a smaller workspace and finish
/// pass, fewer blocks.
template <int TilesPerChunk = 16, int DimChunk = 16>
struct lse_policy {
  static_assert(TilesPerChunk >= 1 && DimChunk >= 1 && DimChunk <= 64);
  static constexpr int tile = 64;        ///< keys and queries per tile (16 x 16 threads, 4 x 4 logits each)
  static constexpr int lanes = 16;       ///< threads along each side of the tile
  static constexpr int per_lane = tile / lanes;
  static constexpr int threads = lanes * lanes;
  static constexpr int tiles_per_chunk = TilesPerChunk;
  static constexpr int dim_chunk = DimChunk;
};

namespace detail {

/// The grid of one call: key tiles x chunks x samples, and the partial sums it writes.
template <class Policy>
struct lse_grid {
  index_t key_tiles = 0, query_tiles = 0, chunks = 0, batch = 0, keys = 0;

  static lse_grid of(index_t batch, index_t heads, index_t queries, index_t keys) {
    lse_grid g;
    g.batch = batch;
    g.keys = keys;
    g.key_tiles = (keys + Policy::tile - 1) / Policy::tile;
    g.query_tiles = (queries + Policy::tile - 1) / Policy::tile;
    const auto tiles = specdiff::detail::checked_product<index_t>("heads * query tiles", heads, g.query_tiles);
    g.chunks = (tiles + Policy::tiles_per_chunk - 1) / Policy::tiles_per_chunk;
    return g;
  }
  std::size_t workspace_bytes() const {
    return specdiff::detail::checked_product<std::size_t>("workspace: batch * chunks * keys * 8", batch, chunks, keys, sizeof(double));
  }
};

template <class Policy, class T>
__global__ void __launch_bounds__(Policy::threads) lse_partials_kernel(device_lse_attention<T> in, index_t query_tiles, index_t chunks, double* partial) {
  constexpr int tile = Policy::tile, lanes = Policy::lanes, per = Policy::per_lane, dc = Policy::dim_chunk;
  __shared__ float q_stage[dc][tile + 1];  // [dim][query]: +1 keeps the transposed stores off one bank
  __shared__ float k_stage[dc][tile + 1];  // [dim][key]
  __shared__ float lse_tile[tile];
  __shared__ double lane_sums[lanes][tile];  // per thread row, per key: the fixed-order reduction's input

  const auto& q = in.queries;
  const auto& k = in.keys;
  const int tx = static_cast<int>(threadIdx.x), ty = static_cast<int>(threadIdx.y), tid = ty * lanes + tx;
  const index_t b = static_cast<index_t>(blockIdx.z), chunk = static_cast<index_t>(blockIdx.y);
  const index_t k0 = static_cast<index_t>(blockIdx.x) * tile;
  const index_t tiles = q.heads * query_tiles;
  const index_t t_begin = chunk * Policy::tiles_per_chunk;
  const index_t t_end = t_begin + Policy::tiles_per_chunk < tiles ? t_begin + Policy::tiles_per_chunk : tiles;

  double key_sum[per] = {};  // this thread's keys k0 + tx + lanes * n, over its queries of every tile
  for (index_t t = t_begin; t < t_end; ++t) {
    const index_t h = t / query_tiles, q0 = (t - h * query_tiles) * tile;
    if (tid < tile) lse_tile[tid] = q0 + tid < q.tokens ? in.lse.at(b, h, q0 + tid) : 0.f;
    float logit[per][per] = {};  // [query m][key n]
    for (index_t d0 = 0; d0 < q.head_dim; d0 += dc) {
      // Stage dc dims of 64 query rows and 64 key rows; zeros past the edges add nothing to a dot product.
      for (int e = tid; e < tile * dc; e += Policy::threads) {
        const int row = e / dc, i = e - row * dc;
        const index_t dim = d0 + i, qt = q0 + row, kt = k0 + row;
        q_stage[i][row] = qt < q.tokens && dim < q.head_dim ? storage_traits<T>::load(q.row(b, h, qt)[dim]) : 0.f;
        k_stage[i][row] = kt < k.tokens && dim < q.head_dim ? storage_traits<T>::load(k.row(b, h, kt)[dim]) : 0.f;
      }
      __syncthreads();
#pragma unroll
      for (int i = 0; i < dc; ++i) {
        float qv[per], kv[per];
#pragma unroll
        for (int m = 0; m < per; ++m) qv[m] = q_stage[i][ty + lanes * m];
#pragma unroll
        for (int n = 0; n < per; ++n) kv[n] = k_stage[i][tx + lanes * n];
#pragma unroll
        for (int m = 0; m < per; ++m)
#pragma unroll
          for (int n = 0; n < per; ++n) logit[m][n] = fmaf(qv[m], kv[n], logit[m][n]);
      }
      __syncthreads();  // the stages are rewritten next round
    }
    // P = exp(scale * q·k - lse): the 4 queries of this thread summed in float (4 terms <= 1), then added to
    // the double running sum in tile order.
    float tile_sum[per] = {};
#pragma unroll
    for (int m = 0; m < per; ++m) {
      if (q0 + ty + lanes * m >= q.tokens) continue;
      const float lse = lse_tile[ty + lanes * m];
#pragma unroll
      for (int n = 0; n < per; ++n) tile_sum[n] += expf(fmaf(in.scale, logit[m][n], -lse));
    }
#pragma unroll
    for (int n = 0; n < per; ++n) key_sum[n] += static_cast<double>(tile_sum[n]);
    __syncthreads();  // lse_tile is rewritten by the next tile
  }
#pragma unroll
  for (int n = 0; n < per; ++n) lane_sums[ty][tx + lanes * n] = key_sum[n];
  __syncthreads();
  if (tid < tile && k0 + tid < k.tokens) {
    double sum = 0.0;
    for (int y = 0; y < lanes; ++y) sum += lane_sums[y][tid];  // fixed order: reproducible
    partial[(static_cast<std::ptrdiff_t>(b) * chunks + chunk) * k.tokens + k0 + tid] = sum;
  }
}

/// Positive sizes of a size query (which passes no data), with the host checks' messages.
template <class T>
void expect_query_sizes(const device_lse_attention<T>& in) {
  specdiff::detail::expect_positive("queries", "batch", in.queries.batch);
  specdiff::detail::expect_positive("queries", "heads", in.queries.heads);
  specdiff::detail::expect_positive("queries", "tokens", in.queries.tokens);
  specdiff::detail::expect_positive("keys", "tokens", in.keys.tokens);
}

template <class Policy, class T>
void lse_column_sums_launch(void* workspace, std::size_t& workspace_bytes, const device_lse_attention<T>& in, index_t query_step,
                            device_span<float> out, column_mode mode, cudaStream_t stream) {
  if (query_step < 1) fail("query_step: must be at least 1, got ", query_step);
  if (workspace == nullptr) {  // the size query: shapes only, as CUB's
    expect_query_sizes(in);
    const index_t sampled = in.queries.tokens / query_step + (in.queries.tokens % query_step != 0 ? 1 : 0);
    workspace_bytes = lse_grid<Policy>::of(in.queries.batch, in.queries.heads, sampled, in.keys.tokens).workspace_bytes();
    return;
  }
  if (out.size < 0) fail("out: negative size ", out.size);
  const auto r = specdiff::detail::resolve(in, out.data, static_cast<std::size_t>(out.size), true);
  double count_factor = 1.0;
  const auto sampled = specdiff::detail::every_nth_query(r.in, query_step, count_factor);
  const auto grid = lse_grid<Policy>::of(sampled.queries.batch, sampled.queries.heads, sampled.queries.tokens, sampled.keys.tokens);
  if (grid.chunks > 65535)
    fail("queries: ", sampled.queries.heads, " heads x ", grid.query_tiles, " tiles of 64 queries need ", grid.chunks, " chunks of ", Policy::tiles_per_chunk,
         ", more than 65535 (raise lse_policy's TilesPerChunk)");
  if (grid.batch > 65535) fail("queries.batch: ", grid.batch, " exceeds 65535");
  expect_workspace(workspace, workspace_bytes, grid.workspace_bytes());
  auto* partial = static_cast<double*>(workspace);
  const dim3 block(Policy::lanes, Policy::lanes);
  const dim3 blocks(static_cast<unsigned>(grid.key_tiles), static_cast<unsigned>(grid.chunks), static_cast<unsigned>(grid.batch));
  lse_partials_kernel<Policy, T><<<blocks, block, 0, stream>>>(sampled, grid.query_tiles, grid.chunks, partial);
  SPECDIFF_CUDA_CHECK_LAUNCH("lse_partials_kernel");
  const std::size_t total = static_cast<std::size_t>(grid.batch) * static_cast<std::size_t>(grid.keys);
  column_finish_kernel<256><<<blocks_for(total, 256), 256, 0, stream>>>(partial, grid.batch, grid.keys, grid.chunks,
                                                                        count_factor / static_cast<double>(sampled.queries.heads), mode, out.data);
  SPECDIFF_CUDA_CHECK_LAUNCH("column_finish_kernel");
}

}  // namespace detail

/// Exact head-averaged attention column sums of one layer from Q, K and the queries' LSE, on `stream`:
/// out[b * keys + k] (+)= (1 / heads) * sum_h sum_q exp(scale * q·k - lse[b][h][q]) over the queries in the
/// view (the C1 queries on a partial step). T: float or bfloat16. Workspace: CUB's two-phase pattern — with
/// a null workspace, only sets workspace_bytes (from the view's sizes; its pointers may be null then).
/// Arguments are checked on the host before any launch, with the host twin's messages; values are not (the
/// device cannot report them without synchronising): a NaN anywhere, or an LSE of -inf, gives non-finite
/// sums, which the classifier's status bit reports downstream; an LSE of +inf silently drops its query. Stream-ordered, allocation-free, capturable in a CUDA graph.
/// Numerics: logits in float (fmaf over head_dim), exp in float, sums in double; the host twin's sums are
/// all double, so the two agree to about head_dim * 2^-24 of |scale * q·k| relative (the test's bound).
template <class Policy = lse_policy<>, class T>
void lse_column_sums(void* workspace, std::size_t& workspace_bytes, const device_lse_attention<T>& in, device_span<float> out, column_mode mode,
                     cudaStream_t stream) {
  static_assert(view_element<std::remove_const_t<T>>,
                "lse_column_sums: Q and K must be float or bfloat16 (specdiff::bfloat16 or __nv_bfloat16: one type to the device API)");
  detail::lse_column_sums_launch<Policy>(workspace, workspace_bytes, in, 1, out, mode, stream);
}

/// The cheaper estimate, as lse_column_sums_estimate on the host: the sums over queries 0, s, 2s, ...
/// (s = query_step) scaled by queries / ceil(queries / s). Its workspace (ask with a null workspace, passing
/// the same query_step) is about s times smaller, and so is its work.
template <class Policy = lse_policy<>, class T>
void lse_column_sums_estimate(void* workspace, std::size_t& workspace_bytes, const device_lse_attention<T>& in, index_t query_step,
                              device_span<float> out, column_mode mode, cudaStream_t stream) {
  static_assert(view_element<std::remove_const_t<T>>,
                "lse_column_sums: Q and K must be float or bfloat16 (specdiff::bfloat16 or __nv_bfloat16: one type to the device API)");
  detail::lse_column_sums_launch<Policy>(workspace, workspace_bytes, in, query_step, out, mode, stream);
}

}  // namespace specdiff::gpu
