// The SD3 MMDiT forward on a CUDA device: the GPU twin of sd3::transformer (examples/engine), for SD3 and
// SD3.5-large configs (joint blocks, qk-norm, context_pre_only last block; MMDiT-X's dual attention and FLUX are
// CPU-only for now). cuBLAS GEMMs with fp32 accumulation, flash-style attention that returns each query's
// log-sum-exp (tensor cores for bf16 at head size 64), and the token-subset forward SpecDiff needs: the C1 image
// tokens (plus the context) run every block against a per-layer K/V cache on the device. docs/engine_cuda.md.
//
//     sd3::gpu::transformer net(model, sd3::gpu::precision::bf16, {.max_batch = 2, .max_image_tokens = 4096});
//     sd3::gpu::workspace ws(net);
//     sd3::gpu::kv_cache kv(net, 2, 4096);
//     net.forward(inputs, velocity_rows, {.image_tokens = c1, .tokens_per_sample = n, .kv = &kv}, ws, stream);
//
// Every pointer in forward_inputs / forward_options is device memory. A forward only enqueues work on its stream
// (no allocation, no host synchronisation), so it can be captured in a CUDA graph. The transformer holds the
// weights and nothing that changes: forward() is const, and its activations live in a `workspace` the caller
// owns (CUB's temp storage, one allocation made once), so concurrent streams share one transformer with a
// workspace each.
//
// Layouts. Latents and velocities are token rows, [sample][token][p * p * channels] with features in proj_out's
// (u, v, c) order (sd3::image_to_patches / patches_to_image convert on the host): the sampler keeps its state in
// this layout for the whole run, and the patch embedding reads it directly (its weight columns are permuted to
// match when the model is uploaded).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

#include <cuda_runtime_api.h>

#include "sd3/model.hpp"

namespace sd3::gpu {

// The operands of the GEMMs and of the attention, and what the K/V cache holds. Accumulation (cuBLAS compute
// type, attention sums, norms) and the residual streams are fp32 in both.
enum class precision : int { fp32 = 0, bf16 = 1 };
const char* name(precision p) noexcept;

// Largest problem a transformer is prepared for; its workspaces are sized from these once.
struct device_limits {
    int max_batch = 2;            // model samples per forward (a CFG batch counts both halves)
    int max_image_tokens = 0;     // 0: (sample_size / patch_size)^2
    int max_context_tokens = 256;
};

class transformer;

namespace detail {
// Frees what allocate_device returned (cudaFree): the deleter of every device allocation the engine owns.
struct device_free {
    void operator()(void* p) const noexcept;
};
void* allocate_device(std::size_t bytes);  // cudaMalloc of at least one byte; specdiff::gpu::cuda_error on failure
}  // namespace detail

// One stream's activations for forwards of one transformer (sized from its limits; allocated here, once), the
// cuBLAS handle they run on, and a status word. A forward uses it from start to end: forwards that may overlap
// need workspaces of their own.
class workspace {
public:
    explicit workspace(const transformer& net);
    ~workspace();
    workspace(workspace&&) noexcept;
    workspace& operator=(workspace&&) noexcept;
    std::size_t bytes() const noexcept;
    // Bit 0, sticky: a forward on this workspace was given an image_tokens list that is not strictly ascending
    // within [0, image tokens) (such ids are clamped, so nothing is read or written out of bounds, but the rows are
    // wrong). Waits for `stream`: a checkpoint, not something for the per-step path.
    unsigned read_status(cudaStream_t stream) const;

private:
    friend class transformer;
    struct impl;
    std::unique_ptr<impl> impl_;
};

// Per-layer keys and values of every image token (after qk-norm), in the transformer's precision:
// [layer][sample][token][hidden], heads contiguous in hidden. A forward refreshes the rows of the tokens it
// computes; a token-subset forward reads the others. Allocated once, here.
class kv_cache {
public:
    kv_cache(const transformer& net, int batch, int image_tokens);

    int layers() const noexcept { return layers_; }
    int batch() const noexcept { return batch_; }
    int image_tokens() const noexcept { return tokens_; }
    int hidden() const noexcept { return hidden_; }
    precision type() const noexcept { return type_; }
    std::size_t bytes() const noexcept;       // keys and values of every layer
    std::size_t slot_bytes() const noexcept;  // one layer's keys (or values)
    // Device pointers to layer `layer`'s [sample][token][hidden] keys / values (elements of type()).
    void* keys(int layer) const noexcept;
    void* values(int layer) const noexcept;

private:
    int layers_ = 0, batch_ = 0, tokens_ = 0, hidden_ = 0;
    precision type_ = precision::fp32;
    std::unique_ptr<void, detail::device_free> memory_;
};

// One forward's inputs: device pointers, fp32.
struct forward_inputs {
    int batch = 0;            // model samples
    int grid_height = 0;      // image tokens per column / row of the patch grid (latent pixels / patch_size)
    int grid_width = 0;
    int context_tokens = 0;
    // [latent_batch][grid_height * grid_width][patch_size^2 * in_channels] token rows; model sample b reads
    // latent sample b % latent_batch (a CFG batch: both halves read the same latents). 0 = batch.
    const float* latent_rows = nullptr;
    int latent_batch = 0;
    float timestep = 0.f;     // sigma * 1000, every sample (a kernel parameter: captured graphs keep it)
    const float* context = nullptr;  // [batch][context_tokens][joint_attention_dim]
    const float* pooled = nullptr;   // [batch][pooled_projection_dim]
};

struct forward_options {
    // Token-subset forward: [batch][tokens_per_sample] ascending image-token ids per sample (device). Null: every
    // token. With a subset, the velocity holds [batch][tokens_per_sample][patch_features] rows and kv is required.
    const std::int32_t* image_tokens = nullptr;
    int tokens_per_sample = 0;
    kv_cache* kv = nullptr;
    // [batch][image tokens], overwritten: per image token, the column sum over the computed image queries of the
    // head-averaged attention probabilities, summed over the layers (sd3::forward_options::attention_probe), from
    // the attention's LSE (specdiff::gpu::lse_column_sums). Null: not measured.
    float* attention_probe = nullptr;
    // 1: the exact sums. s > 1: the estimate over every s-th computed query, scaled up
    // (specdiff::gpu::lse_column_sums_estimate: about s times less work; an odd s keeps the ranking, docs/cuda.md).
    int probe_query_step = 1;
    // bf16 with head size 64 or 128 runs the FlashAttention-2-class kernel (attention_fa2.cuh: mma.sync, cp.async,
    // split over keys on steps with few queries) and folds the exact probe into a tensor-core sweep. true: the
    // reference kernels (attention.cuh) and the library's lse_column_sums instead — what the gpu tests compare it
    // with. fp32 and other head sizes always run the reference kernels.
    bool reference_attention = false;
};

class transformer {
public:
    // Uploads `m` (fp32 weights, or rounded once to bf16) and allocates every workspace for `limits`. Throws
    // std::invalid_argument naming the field for a model or limit this engine does not run (MMDiT-X dual
    // attention, a head size over 128, non-positive limits, sizes past int), specdiff::gpu::cuda_error on a
    // CUDA failure (no device, out of memory). The model is not kept: the host copy may go.
    transformer(const model& m, precision type, const device_limits& limits = {});
    ~transformer();
    transformer(transformer&&) noexcept;
    transformer& operator=(transformer&&) noexcept;

    const transformer_config& config() const noexcept;
    precision type() const noexcept;
    const device_limits& limits() const noexcept;
    int hidden() const noexcept;
    int patch_features() const noexcept;  // floats of a velocity row (p * p * out_channels)
    int patch_inputs() const noexcept;    // floats of a latent row (p * p * in_channels)
    std::size_t weight_bytes() const noexcept;

    // velocity: [batch][image tokens or tokens_per_sample][patch_features] device rows. Checks every size and
    // pointer on the host first (std::invalid_argument naming the field and value), then only enqueues on `stream`.
    void forward(const forward_inputs& in, float* velocity, const forward_options& options, workspace& w, cudaStream_t stream) const;
    void forward(const forward_inputs& in, float* velocity, workspace& w, cudaStream_t stream) const { forward(in, velocity, {}, w, stream); }

private:
    friend class workspace;
    struct impl;
    std::unique_ptr<impl> impl_;
};

}  // namespace sd3::gpu
