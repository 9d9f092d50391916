#include "methods/flops.hpp"

namespace methods {

double block_flops(const sd3::transformer_config& c, int image_tokens, int context_tokens, int layer, const block_work& w) {
  const double d = c.hidden(), n = image_tokens, ctx = context_tokens;
  const bool last = layer + 1 == c.num_layers, dual = c.dual_attention(layer);
  double f = 2.0 * d * (dual ? 9 : 6) * d + 2.0 * d * (last ? 2 : 6) * d;  // AdaLN modulation, both streams
  if (w.attention) {
    const double q = w.query_tokens + ctx;         // queries: computed image tokens + context
    f += 2.0 * q * d * 3 * d;                      // q, k, v projections
    f += 2.0 * 2.0 * q * (n + ctx) * d;            // QK^T and PV over every key
    f += 2.0 * (w.query_tokens + (last ? 0 : ctx)) * d * d;  // to_out, to_add_out
    if (dual) {                                    // MMDiT-X: image queries over the image keys
      const double qi = w.query_tokens;
      f += 2.0 * qi * d * 3 * d + 2.0 * 2.0 * qi * n * d + 2.0 * qi * d * d;
    }
  }
  f += 2.0 * 2.0 * w.mlp_tokens * d * 4 * d;       // feed-forward D -> 4D -> D
  if (!last && w.context_mlp) f += 2.0 * 2.0 * ctx * d * 4 * d;
  return f;
}

double outer_flops(const sd3::transformer_config& c, int context_tokens, int final_tokens) {
  const double d = c.hidden(), p2 = c.patch_size * c.patch_size;
  double f = 2.0 * final_tokens * p2 * c.in_channels * d;                   // patch embedding
  f += 2.0 * (c.timestep_channels() * d + d * d);                            // timestep MLP
  f += 2.0 * (c.pooled_projection_dim * d + d * d);                          // pooled MLP
  f += 2.0 * context_tokens * c.joint_attention_dim * static_cast<double>(c.caption_projection_dim);
  f += 2.0 * d * 2 * d + 2.0 * final_tokens * d * c.patch_features();       // norm_out, proj_out
  return f;
}

double full_forward_flops(const sd3::transformer_config& c, int image_tokens, int context_tokens) {
  return subset_forward_flops(c, image_tokens, context_tokens, image_tokens);
}

double subset_forward_flops(const sd3::transformer_config& c, int image_tokens, int context_tokens, int computed) {
  return forward_flops(c, image_tokens, context_tokens, computed,
                       [&](int) { return block_work{computed, true, computed, true}; });
}

}  // namespace methods
