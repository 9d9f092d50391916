// A test hook of the engine (not part of its interface): runs the FlashAttention-2-class kernel (attention_fa2.cuh)
// and the reference kernels (attention.cuh, and the library's lse_column_sums for the probe) on the same random bf16
// inputs on the device, and compares both with an fp64 host twin computed from those same bf16 values. Used by the
// gpu/engine_fa2 suite (tests/engine_cuda); host-includable (no CUDA types).
#pragma once

#include <cstdint>
#include <string>

namespace sd3::gpu::detail {

struct attention_case {
    int batch = 2, heads = 2, head_dim = 64;
    int image_queries = 37, context_queries = 5;  // queries: [image; context], as the engine's joint attention
    int image_keys = 35, context_keys = 5;        // keys and values likewise; the probe's keys are the image keys
    int splits = 1;                               // 1: one pass; > 1: split over keys, then the LSE merge
    float logit_scale = 1.f;                      // multiplies the softmax scale 1/sqrt(head_dim): > 1 sharper
    std::uint64_t seed = 1;
};

struct attention_errors {
    // Largest |got - twin| over every output element, divided by the largest |twin| (outputs are bf16).
    double fa2_out = 0, reference_out = 0;
    // Largest |got - twin| of the natural-log LSE.
    double fa2_lse = 0, reference_lse = 0;
    // Relative L2 of the probe's column sums (image queries x image keys, head-averaged) against the twin.
    double fa2_probe = 0, library_probe = 0;
    int splits_used = 1;
    std::string describe() const;
};

// Throws std::invalid_argument for an unsupported case (head_dim not 64 or 128, non-positive sizes) and
// specdiff::gpu::cuda_error on a CUDA failure.
attention_errors compare_attention(const attention_case& c);

}  // namespace sd3::gpu::detail
