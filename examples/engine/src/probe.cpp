// The attention probe (forward_options::attention_probe): per image token, the column sum over the computed
// queries of the head-averaged attention probabilities, summed over the layers that computed joint attention.
// The attention (attention.cpp) hands each of its tasks a slice of probe_parts; per head, once the task's
// queries have their log-sum-exp, probe_columns makes a second pass over the image keys (probabilities
// exp(score * scale - lse)); reduce_probe then sums the tasks' slices in a fixed order, so results do not depend
// on the thread count.
#include <algorithm>
#include <cstddef>

#include "attention_kernel.hpp"
#include "transformer_impl.hpp"

namespace sd3 {
using namespace detail;

float* transformer::impl::probe_part(int task, bool image_chunk) {
    if (!image_chunk && !opts->probe_context_queries) return nullptr;
    float* part = probe_parts.data() + static_cast<std::size_t>(task) * N;
    std::fill_n(part, N, 0.0f);
    return part;
}

void transformer::impl::probe_columns(const attention_scratch& w, const float* packed_image_keys, int nq, int q_panels,
                                      float scale, float* part) const {
    for (int j0 = 0; j0 < N; j0 += key_block) {
        const int nk = std::min(key_block, N - j0);
        block_scores(w, hd, packed_image_keys, j0, nk, q_panels);
        vec sums(part + j0, nk);
        for (int r = 0; r < nq; ++r)
            sums += (const_vec(w.s + static_cast<std::ptrdiff_t>(r) * key_block, nk) * scale - w.lse[r]).exp();
    }
}

void transformer::impl::reduce_probe(int per_sample, int image_chunks) {
    const int col_chunks = ceil_div(N, 256);
    parallel_for(split(), B * col_chunks, static_cast<double>(B) * N * per_sample, [&](int t, int) {
        const int b = t / col_chunks, c0 = (t % col_chunks) * 256, nc = std::min(256, N - c0);
        vec dst(opts->attention_probe.data() + static_cast<std::size_t>(b) * N + c0, nc);
        const int counted = opts->probe_context_queries ? per_sample : image_chunks;
        for (int chunk = 0; chunk < counted; ++chunk)
            dst += const_vec(probe_parts.data() + static_cast<std::size_t>(b * per_sample + chunk) * N + c0, nc) *
                   (1.0f / static_cast<float>(heads * head_share));  // Ulysses: the rank's heads of all
    });
}

}  // namespace sd3
