// FLOPs a forward executes (2 per multiply-add; normalisations and activations are left out, as is usual),
// from the work each block does. Used for the FLOP ratio: full FLOPs / executed FLOPs.
#pragma once

#include "sd3/config.hpp"
#include "sd3/flux_model.hpp"
#include "sd3/transformer.hpp"

namespace methods {

/// The work of one block for one sample.
struct block_work {
  int query_tokens = 0;   ///< image tokens whose q/k/v, attention and output projection are computed
  bool attention = true;  ///< false when the attention modules' outputs are reused (both, in an MMDiT-X block)
  int mlp_tokens = 0;     ///< image tokens whose MLP is computed
  bool context_mlp = true;
};

/// The counts below exist for each architecture's config and for an engine (whichever model it runs).
/// Block `layer`'s FLOPs for one sample. SD3: the last block has no context outputs; the blocks in
/// dual_attention_layers have MMDiT-X's second, image-only attention. FLUX: double-stream blocks, then
/// single-stream blocks (one modulation; every token, context included, runs q/k/v, the attention and the MLP
/// through proj_out's two halves).
double block_flops(const sd3::transformer_config& c, int image_tokens, int context_tokens, int layer, const block_work& w);
double block_flops(const sd3::flux_config& c, int image_tokens, int context_tokens, int layer, const block_work& w);
double block_flops(const sd3::transformer& net, int image_tokens, int context_tokens, int layer, const block_work& w);
/// Everything outside the blocks for one sample.
double outer_flops(const sd3::transformer_config& c, int context_tokens, int final_tokens);
double outer_flops(const sd3::flux_config& c, int context_tokens, int final_tokens);
double outer_flops(const sd3::transformer& net, int context_tokens, int final_tokens);

inline int block_count(const sd3::transformer_config& c) { return c.num_layers; }
inline int block_count(const sd3::flux_config& c) { return c.num_layers + c.num_single_layers; }
inline int block_count(const sd3::transformer& net) { return net.blocks(); }

/// FLOPs of one forward for one sample: `final_tokens` image tokens go through the embedding and proj_out;
/// `work(layer)` describes each block.
template <class Network, class Work>
double forward_flops(const Network& c, int image_tokens, int context_tokens, int final_tokens, Work&& work) {
  double f = outer_flops(c, context_tokens, final_tokens);
  for (int l = 0; l < block_count(c); ++l) f += block_flops(c, image_tokens, context_tokens, l, work(l));
  return f;
}

/// A full forward for one sample.
template <class Network>
double full_forward_flops(const Network& c, int image_tokens, int context_tokens) {
  return forward_flops(c, image_tokens, context_tokens, image_tokens,
                       [&](int) { return block_work{image_tokens, true, image_tokens, true}; });
}
/// A token-subset forward: `computed` image tokens run every block against all keys/values.
template <class Network>
double subset_forward_flops(const Network& c, int image_tokens, int context_tokens, int computed) {
  return forward_flops(c, image_tokens, context_tokens, computed, [&](int) { return block_work{computed, true, computed, true}; });
}

}  // namespace methods
