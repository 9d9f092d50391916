// The feed-forward stage: norm+modulate, ff1 with GELU (tanh), ff2, over every active row or a hook's token subset.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>

#include "sd3/errors.hpp"
#include "sd3/flux_model.hpp"
#include "sd3/gemm.hpp"
#include "sd3/model.hpp"
#include "sd3/resources.hpp"
#include "sd3/transformer.hpp"
#include "sd3/workers.hpp"
#include "transformer_impl.hpp"

namespace sd3 {
using namespace detail;

// The MLP of a stream up to its output (before the gate), into `out` [active rows, D]: every active row, or (subset)
// the hook's tokens, whose rows also go to the hook's buffer, which then feeds every row; nothing in reuse mode.
void transformer::impl::mlp_compute(stream s, const module_hook& h, const block_plan& p, float* out) {
    const int si = static_cast<int>(s);
    if (h.mode != module_mode::reuse) {
        const int rows = tokens_of(s), all = all_tokens_of(s);
        // Rows to compute, as active-row positions per sample: all rows, or the hook's subset.
        int count = rows;
        const std::int32_t* pos = nullptr;
        if (h.mode == module_mode::subset) {
            count = static_cast<int>(h.tokens.size() / B);
            for (int b = 0; b < B; ++b) {
                int j = 0;
                for (int i = 0; i < count; ++i) {
                    const std::int32_t t = h.tokens[static_cast<std::size_t>(b) * count + i];
                    while (token_id(s, b, j) < t) ++j;  // validated: t is an active token
                    positions[static_cast<std::size_t>(b) * count + i] = j;
                }
            }
            pos = positions.data();
        }
        const float* x = x_of(s);
        float* nrm = s == stream::image ? nrm_img.data() : nrm_ctx.data();
        parallel_for(split(), B * count, norm_work * B * count * D, [&](int r, int) {
            const int b = r / count, src_row = pos ? pos[r] : r % count;
            const float* md = modulation_of(s, b);
            norm_modulate(x + (static_cast<std::size_t>(b) * rows + src_row) * D, nrm + static_cast<std::size_t>(r) * D, D,
                          md + p.mlp[si].shift, md + p.mlp[si].scale);
        });
        linear_rows(split(), nrm, D, B * count, *p.ff1[si], hidden.data(), F, gelu_tanh_epilogue{});
        linear_rows(split(), hidden.data(), F, B * count, *p.ff2[si], out, D);
        if (h.mode == module_mode::subset) {  // computed rows go to the caller's buffer, which then feeds every row
            parallel_for(split(), B, static_cast<double>(B) * count * D, [&](int b, int) {
                for (int i = 0; i < count; ++i) {
                    const std::size_t r = static_cast<std::size_t>(b) * count + i;
                    std::copy_n(out + r * D, D, h.rows + (static_cast<std::size_t>(b) * all + h.tokens[r]) * D);
                }
            });
        }
    }
}

}  // namespace sd3
