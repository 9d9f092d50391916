// FLOPs a forward executes (2 per multiply-add; normalisations and activations are left out, as is usual),
// from the work each block does. Used for the FLOP ratio: full FLOPs / executed FLOPs.
#pragma once

#include "sd3/config.hpp"

namespace methods {

/// The work of one block for one sample.
struct block_work {
  int query_tokens = 0;   ///< image tokens whose q/k/v, attention and output projection are computed
  bool attention = true;  ///< false when the attention modules' outputs are reused (both, in an MMDiT-X block)
  int mlp_tokens = 0;     ///< image tokens whose MLP is computed
  bool context_mlp = true;
};

/// FLOPs of one forward for one sample: `final_tokens` image tokens go through patch embedding and
/// proj_out; `work(layer)` describes each block.
template <class Work>
double forward_flops(const sd3::transformer_config& c, int image_tokens, int context_tokens, int final_tokens, Work&& work);

/// A full forward for one sample.
double full_forward_flops(const sd3::transformer_config& c, int image_tokens, int context_tokens);
/// A token-subset forward: `computed` image tokens run every block against all keys/values.
double subset_forward_flops(const sd3::transformer_config& c, int image_tokens, int context_tokens, int computed);
/// Block `layer`'s FLOPs for one sample (the last block has no context outputs; the blocks in
/// dual_attention_layers have MMDiT-X's second, image-only attention).
double block_flops(const sd3::transformer_config& c, int image_tokens, int context_tokens, int layer, const block_work& w);
/// Everything outside the blocks for one sample.
double outer_flops(const sd3::transformer_config& c, int context_tokens, int final_tokens);

template <class Work>
double forward_flops(const sd3::transformer_config& c, int image_tokens, int context_tokens, int final_tokens, Work&& work) {
  double f = outer_flops(c, context_tokens, final_tokens);
  for (int l = 0; l < c.num_layers; ++l) f += block_flops(c, image_tokens, context_tokens, l, work(l));
  return f;
}

}  // namespace methods
