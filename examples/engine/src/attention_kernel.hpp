// The attention's one score product, shared by the attention (attention.cpp) and its probe (probe.cpp). Not installed.
#pragma once

#include <cstddef>

#include "sd3/gemm.hpp"
#include "transformer_impl.hpp"

namespace sd3::detail {

// S[0:qc, 0:nk) = Q K^T for the key block at j0 of packed keys (nk keys, the rest of S's columns unused): the
// query chunk packed in w.q, `q_panels` register panels of it, the scores into w.s with row stride key_block.
inline void block_scores(const attention_scratch& w, int hd, const float* keys, int j0, int nk, int q_panels) {
    const gemm::tile_shape tile = gemm::register_tile();
    const std::ptrdiff_t panel = static_cast<std::ptrdiff_t>(gemm::packed_rows_floats(tile.rows));
    for (int kp = 0; kp * tile.cols < nk; ++kp)
        for (int qp = 0; qp < q_panels; ++qp)
            gemm::micro_kernel(hd, w.q + qp * panel, keys + static_cast<std::ptrdiff_t>(j0 + kp * tile.cols) * hd, tile.cols,
                               w.s + qp * panel + kp * tile.cols, key_block, gemm::start::zero);
}

}  // namespace sd3::detail
