// The attention probe of a device engine, as one object: it owns `his` (the attention each image token
// received, summed over layers: what the accelerator's scorer reads) and the workspace of the LSE column sums
// (CUB-style two-phase sizing done once, from the sizes), takes a layer's Q, K and LSE as the engine's
// attention left them, and knows overwrite vs accumulate (the first layer after begin() overwrites, every
// later one adds). So an engine's probe is three calls: begin(), add_layer(...) per layer, his().
//
// Memory is the caller's, like the accelerator's: memory_bytes(shape) (no CUDA call) says how much, the
// constructor takes it. Every call checks its arguments on the host, then only enqueues: no allocation, no
// synchronisation, capturable in a CUDA graph.
#pragma once

#include "../common.hpp"  // first: the C++20 check
#include "lse.cuh"
#include "rows.cuh"
#include "views.cuh"

#include <cmath>
#include <cstddef>

namespace specdiff::gpu {

/// The sizes of an attention_probe. Per model call: `batch` samples (both CFG halves), `keys` image tokens per
/// sample (the keys whose received attention is wanted), `heads` heads of `head_dim`, and at most
/// `max_queries` queries per sample and layer (the image tokens on dense steps and in the speculative pass;
/// |C1| on partial steps: the probe takes any count up to this).
struct probe_shape {
  index_t batch = 1;
  index_t heads = 1;
  index_t head_dim = 0;
  index_t keys = 0;
  index_t max_queries = 0;
  index_t query_step = 1;  ///< > 1: the estimate over queries 0, s, 2s, ... (lse_column_sums_estimate)
  float scale = 0.f;       ///< the softmax scale the attention used; 0 = 1 / sqrt(head_dim)

  void validate() const {
    if (batch <= 0) specdiff::detail::fail("probe_shape.batch: must be positive, got ", batch);
    if (heads <= 0) specdiff::detail::fail("probe_shape.heads: must be positive, got ", heads);
    if (head_dim <= 0) specdiff::detail::fail("probe_shape.head_dim: must be positive, got ", head_dim);
    if (keys <= 0) specdiff::detail::fail("probe_shape.keys: must be positive, got ", keys);
    if (max_queries <= 0) specdiff::detail::fail("probe_shape.max_queries: must be positive, got ", max_queries);
    if (query_step < 1) specdiff::detail::fail("probe_shape.query_step: must be at least 1, got ", query_step);
    if (!(scale >= 0.f) || !std::isfinite(scale)) specdiff::detail::fail("probe_shape.scale: must be finite and >= 0 (0: 1 / sqrt(head_dim)), got ", scale);
    (void)specdiff::detail::checked_product<index_t>("probe_shape.batch * keys", batch, keys);
    (void)specdiff::detail::checked_product<index_t>("probe_shape.heads * head_dim", heads, head_dim);
  }
  float softmax_scale() const { return scale > 0.f ? scale : 1.f / std::sqrt(static_cast<float>(head_dim)); }
};

/// T: the element of Q and K, float or bfloat16 (specdiff::bfloat16 or __nv_bfloat16: the same to the probe).
template <view_element T, class Policy = lse_policy<>>
class attention_probe {
 public:
  /// Bytes for `his` and the workspace. Checks the shape; makes no CUDA call.
  static std::size_t memory_bytes(const probe_shape& shape) { return layout(shape).total; }

  /// The probe in `memory` (memory_bytes(shape) bytes, 256-byte aligned as cudaMalloc returns, caller-owned and
  /// outliving the probe). No CUDA call.
  attention_probe(const probe_shape& shape, void* memory, std::size_t bytes) : shape_((shape.validate(), shape)), offsets_(layout(shape_)) {
    detail::expect_memory("memory", memory, bytes, offsets_.total);
    his_ = detail::workspace_layout::at<float>(memory, offsets_.his);
    workspace_ = detail::workspace_layout::at<void>(memory, offsets_.workspace);
  }

  /// A new model call: the next add_layer overwrites `his`.
  void begin() { layers_ = 0; }

  /// One layer's attention, as the engine's attention call left it, on `stream`:
  ///   q:   the call's queries, [batch][queries][heads * head_dim] (row stride q_row_stride elements; 0 = packed)
  ///   k:   the layer's keys for every image token, [batch][keys][heads * head_dim] (k_row_stride; 0 = packed)
  ///   lse: the queries' log-sum-exp, [batch][heads][queries] floats (flash attention's softmax_lse)
  /// `queries` is the call's query count per sample (<= max_queries). The first layer after begin() overwrites
  /// `his`, later ones add to it.
  void add_layer(const T* q, index_t queries, const T* k, const float* lse, cudaStream_t stream, std::ptrdiff_t q_row_stride = 0,
                 std::ptrdiff_t k_row_stride = 0) {
    if (queries <= 0 || queries > shape_.max_queries)
      specdiff::detail::fail("queries: must lie in [1, ", shape_.max_queries, "] (probe_shape.max_queries), got ", queries);
    const std::ptrdiff_t width = static_cast<std::ptrdiff_t>(shape_.heads) * shape_.head_dim;
    const std::ptrdiff_t qs = q_row_stride == 0 ? width : q_row_stride, ks = k_row_stride == 0 ? width : k_row_stride;
    if (qs < width) specdiff::detail::fail("q_row_stride: ", qs, " is smaller than heads * head_dim = ", width);
    if (ks < width) specdiff::detail::fail("k_row_stride: ", ks, " is smaller than heads * head_dim = ", width);
    const device_lse_attention<T> layer{
        {q, shape_.batch, shape_.heads, queries, shape_.head_dim, qs, shape_.head_dim, queries * qs},
        {k, shape_.batch, shape_.heads, shape_.keys, shape_.head_dim, ks, shape_.head_dim, shape_.keys * ks},
        {lse},
        shape_.softmax_scale()};
    const column_mode mode = layers_ == 0 ? column_mode::overwrite : column_mode::accumulate;
    std::size_t bytes = offsets_.workspace_bytes;
    const device_span<float> out{his_, shape_.batch * shape_.keys};
    if (shape_.query_step == 1) lse_column_sums<Policy>(workspace_, bytes, layer, out, mode, stream);
    else lse_column_sums_estimate<Policy>(workspace_, bytes, layer, shape_.query_step, out, mode, stream);
    ++layers_;
  }

  /// The attention each image token received, summed over the layers added since begin(): batch * keys floats
  /// in device memory, [sample][token], what record_speculation and complete_step take.
  device_span<const float> his() const {
    if (layers_ == 0) specdiff::detail::fail_logic("his: no layer was added since begin()");
    return {his_, shape_.batch * shape_.keys};
  }
  index_t layers() const { return layers_; }
  const probe_shape& shape() const { return shape_; }

 private:
  struct offsets {
    std::size_t his = 0, workspace = 0, workspace_bytes = 0, total = 0;
  };
  // The size query of the largest call (max_queries): the workspace only shrinks with fewer queries.
  static offsets layout(const probe_shape& s) {
    s.validate();
    const device_lse_attention<T> largest{{nullptr, s.batch, s.heads, s.max_queries, s.head_dim}, {nullptr, s.batch, s.heads, s.keys, s.head_dim}, {}, s.softmax_scale()};
    offsets o;
    std::size_t bytes = 0;
    if (s.query_step == 1) lse_column_sums<Policy>(nullptr, bytes, largest, {}, column_mode::overwrite, nullptr);
    else lse_column_sums_estimate<Policy>(nullptr, bytes, largest, s.query_step, {}, column_mode::overwrite, nullptr);
    detail::workspace_layout l;
    o.his = l.add(static_cast<std::size_t>(s.batch) * static_cast<std::size_t>(s.keys) * sizeof(float));
    o.workspace = l.add(bytes);
    o.workspace_bytes = bytes;
    o.total = l.bytes();
    return o;
  }

  probe_shape shape_;
  offsets offsets_;
  float* his_ = nullptr;
  void* workspace_ = nullptr;
  index_t layers_ = 0;
};

}  // namespace specdiff::gpu
