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

double block_flops(const sd3::flux_config& c, int image_tokens, int context_tokens, int layer, const block_work& w) {
  const double d = c.hidden(), n = image_tokens, ctx = context_tokens;
  if (layer < c.num_layers) {  // double-stream: a joint block with context outputs
    double f = 2.0 * 2.0 * d * 6 * d;                // AdaLN modulation, both streams
    if (w.attention) {
      const double q = w.query_tokens + ctx;
      f += 2.0 * q * d * 3 * d + 2.0 * 2.0 * q * (n + ctx) * d + 2.0 * q * d * d;  // q/k/v, attention, to_out + to_add_out
    }
    f += 2.0 * 2.0 * w.mlp_tokens * d * 4 * d;
    if (w.context_mlp) f += 2.0 * 2.0 * ctx * d * 4 * d;
    return f;
  }
  double f = 2.0 * d * 3 * d;                        // one modulation (shift, scale, gate)
  if (w.attention) {
    const double q = w.query_tokens + ctx;
    f += 2.0 * q * d * 3 * d + 2.0 * 2.0 * q * (n + ctx) * d + 2.0 * q * d * d;  // q/k/v, attention, proj_out's attention half
  }
  f += 2.0 * 2.0 * w.mlp_tokens * d * 4 * d;         // proj_mlp and proj_out's MLP half
  if (w.context_mlp) f += 2.0 * 2.0 * ctx * d * 4 * d;
  return f;
}

double outer_flops(const sd3::flux_config& c, int context_tokens, int final_tokens) {
  const double d = c.hidden();
  double f = 2.0 * final_tokens * c.in_channels * d;                         // x_embedder
  f += 2.0 * (c.timestep_channels() * d + d * d) * (c.guidance_embeds ? 2 : 1);  // timestep (and guidance) MLP
  f += 2.0 * (c.pooled_projection_dim * d + d * d);                          // pooled MLP
  f += 2.0 * context_tokens * c.joint_attention_dim * d;                     // context_embedder
  f += 2.0 * d * 2 * d + 2.0 * final_tokens * d * c.patch_features();       // norm_out, proj_out
  return f;
}

double block_flops(const sd3::transformer& net, int image_tokens, int context_tokens, int layer, const block_work& w) {
  return net.arch() == sd3::architecture::flux ? block_flops(net.flux(), image_tokens, context_tokens, layer, w)
                                               : block_flops(net.config(), image_tokens, context_tokens, layer, w);
}

double outer_flops(const sd3::transformer& net, int context_tokens, int final_tokens) {
  return net.arch() == sd3::architecture::flux ? outer_flops(net.flux(), context_tokens, final_tokens)
                                               : outer_flops(net.config(), context_tokens, final_tokens);
}

}  // namespace methods
