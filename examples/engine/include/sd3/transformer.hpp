// The MMDiT forward pass with caching hooks, for three architectures: SD3 and SD3.5-large (diffusers
// SD3Transformer2DModel), SD3.5-medium (the same class with dual_attention_layers: MMDiT-X) and FLUX (diffusers
// FluxTransformer2DModel: double-stream blocks, then single-stream blocks, rotary positions).
//
// Plain use:
//     sd3::transformer net(model, {.max_batch = 2, .max_context_tokens = 77}, /*threads=*/4);
//     net.forward(inputs, velocity);                    // velocity: [batch, out_channels, height, width]
//     sd3::transformer flux(flux_model, {.max_batch = 1, .max_height = 64, .max_width = 64, .max_context_tokens = 512});
//     flux.forward(inputs, velocity);                   // latents and velocity: [batch, height * width, channels]
//
// Hooked use (see docs/engine.md): a forward_options object selects
//   - a token-subset forward (only some image tokens run the blocks; keys/values of the others come from a
//     per-layer kv_cache, which the computed tokens refresh),
//   - the attention probe (attention received per image token, summed over layers),
//   - per layer, per stream, per module (attention / MLP output, before the gate) overrides: reuse caller rows,
//     compute only a token subset of the MLP, and read the computed values back.
// All workspaces are sized in the constructor; forward() does not allocate.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <vector>

#include "sd3/config.hpp"
#include "sd3/workers.hpp"

namespace sd3 {

struct model;
struct flux_model;
class transformer;
struct flux_config;

// Which network a transformer runs (the model it was built from).
enum class architecture : int { sd3 = 0, flux = 1 };

// Most threads a transformer accepts (each thread also gets its own attention-score workspace).
inline constexpr int max_threads = 1024;

// A loop of a forward is split across the team only where each chunk gets at least this much work (multiply-adds,
// or element touches for the element-wise loops). Below it, waking a worker costs more than it saves, and on a busy
// machine a woken worker can lose its core in the middle of a chunk while the caller waits for it: a partial
// forward's GEMMs over a few dozen rows run on the caller alone. Measured in docs/engine.md ("Threads under load").
inline constexpr double default_min_chunk_work = 1 << 19;

// Largest problem a transformer object is prepared for (workspaces are sized from these once).
struct engine_limits {
    int max_batch = 2;
    int max_height = 0;           // SD3: latent pixels, 0 = config.sample_size. FLUX: token rows (required)
    int max_width = 0;            // SD3: latent pixels, 0 = config.sample_size. FLUX: token columns (required)
    int max_context_tokens = 256;
};

// One forward call's inputs: views over caller memory, diffusers' layouts.
// SD3: latents [batch, in_channels, height, width] in latent pixels (multiples of patch_size).
// FLUX: height x width is the token grid (the packed latent: FluxPipeline's 2 x 2 patches), latents the packed
// sequence [batch, height * width, in_channels] with tokens row-major over the grid.
struct forward_inputs {
    int batch = 0;
    int height = 0;
    int width = 0;
    int context_tokens = 0;
    std::span<const float> latents;
    std::span<const float> timesteps;  // [batch], sigma * 1000 for every architecture (FLUX's model scales t / 1000 back)
    std::span<const float> context;    // [batch, context_tokens, joint_attention_dim]
    std::span<const float> pooled;     // [batch, pooled_projection_dim]
    // FLUX with guidance_embeds only: [batch] guidance scales (diffusers' `guidance`, e.g. 3.5); empty otherwise.
    std::span<const float> guidance = {};
    // FLUX only, optional: rotary position ids, (axis 0, row, column) per token as floats, diffusers' img_ids
    // [height * width, 3] and txt_ids [context_tokens, 3]. Empty: FluxPipeline's, (0, row, column) and zeros.
    std::span<const float> image_ids = {};
    std::span<const float> text_ids = {};
};

// Which attention of a block: the joint one (image and context tokens), or MMDiT-X's second, image-only one
// (diffusers' attn2, in the blocks of transformer_config::dual_attention_layers).
enum class attention_kind : int { joint = 0, image_only = 1 };

// Per-layer keys and values of every image token (after qk-norm), the state a token-subset forward reads
// for the tokens it does not compute: one slot per layer for the joint attention, and one per dual-attention
// layer for its image-only attention. Layout: [slot][sample][token][hidden], heads contiguous in hidden.
// FLUX: one slot per double-stream block, then one per single-stream block (keys after qk-norm and rotation).
class kv_cache {
public:
    kv_cache(const transformer_config& config, int max_batch, int max_image_tokens);
    kv_cache(const flux_config& config, int max_batch, int max_image_tokens);
    // For the model `net` runs. head_ranks > 1: the cache of one Ulysses rank (forward_options::ulysses), which holds
    // its heads/head_ranks heads of every token (hidden() = net.hidden() / head_ranks); heads % head_ranks must be 0.
    kv_cache(const transformer& net, int max_batch, int max_image_tokens, int head_ranks = 1);
    int layers() const noexcept { return layers_; }
    const std::vector<int>& dual_attention_layers() const noexcept { return dual_; }
    int max_batch() const noexcept { return max_batch_; }
    int max_image_tokens() const noexcept { return max_tokens_; }
    int hidden() const noexcept { return hidden_; }
    // nullptr for image_only on a layer without that attention.
    float* keys(int layer, int sample, attention_kind a = attention_kind::joint) noexcept { return at(k_, layer, sample, a); }
    float* values(int layer, int sample, attention_kind a = attention_kind::joint) noexcept { return at(v_, layer, sample, a); }
    const float* keys(int layer, int sample, attention_kind a = attention_kind::joint) const noexcept {
        return at(k_, layer, sample, a);
    }
    const float* values(int layer, int sample, attention_kind a = attention_kind::joint) const noexcept {
        return at(v_, layer, sample, a);
    }

private:
    kv_cache(int layers, int hidden, std::vector<int> dual, int max_batch, int max_image_tokens);
    template <class Floats>
    auto at(Floats& floats, int layer, int sample, attention_kind a) const noexcept -> decltype(floats.data()) {
        const int slot = a == attention_kind::joint ? layer : slot_of_[static_cast<std::size_t>(layer)];
        if (slot < 0) return nullptr;
        return floats.data() + (static_cast<std::size_t>(slot) * max_batch_ + sample) * max_tokens_ * hidden_;
    }
    int layers_, max_batch_, max_tokens_, hidden_;
    std::vector<int> dual_;
    std::vector<int> slot_of_;  // per layer: the image-only attention's slot, or -1
    std::vector<float> k_, v_;
};

enum class stream : int { image = 0, context = 1 };

enum class module_mode : std::uint8_t {
    compute,  // compute for every active token; if `rows` is set, also write the output there (read-back)
    reuse,    // take every active token's output from `rows`; the module is not computed
    subset,   // MLP only: compute `tokens`, write them to `rows`; every other token's output is read from `rows`
};

// One caching site: a module's output before the AdaLN gate (attention = after to_out / to_add_out;
// MLP = after ff.net.2), for one stream of one block. A FLUX single-stream block computes
// gate * proj_out([attention, mlp]); its sites are the two halves of that product, proj_out's attention columns
// times the attention output and its MLP columns times the MLP activation plus the bias, which add up to it.
struct module_hook {
    module_mode mode = module_mode::compute;
    // [batch, stream tokens, hidden] caller memory indexed by absolute token id (image: (H/p)*(W/p) tokens
    // row-major over the patch grid; context: context_tokens). Rows of tokens not active are left untouched.
    float* rows = nullptr;
    // subset mode: [batch * m], per sample ascending absolute token ids, the same count m for every sample;
    // in a token-subset forward they must be among the active image tokens.
    std::span<const std::int32_t> tokens;
};

struct block_hooks {
    module_hook attention[2];  // indexed by stream: [0] image, [1] context
    module_hook mlp[2];
    // MMDiT-X blocks only (transformer_config::dual_attention_layers): the image-only attention's output (after
    // attn2.to_out), modes compute and reuse. Other blocks must leave it {compute, nullptr}.
    module_hook attention2;
};

// Step-level caching (First-Block cache, DBCache, TeaCache): the hidden states between two blocks, handed to
// forward_options::between_blocks. Views into the engine's workspace, valid during the call only.
struct block_boundary {
    int next_layer = 0;  // the block about to run; num_layers = the final layer (norm_out, proj_out) is next
    std::span<float> image;    // [batch, active image tokens, hidden]: the image stream, editable
    std::span<float> context;  // [batch, context tokens, hidden]: the context stream, editable
    // next_layer's AdaLN-Zero output for the image stream, [batch, 6 * hidden]: shift, scale, gate (attention),
    // shift, scale, gate (MLP), as diffusers chunks it ([batch, 9 * hidden] in an MMDiT-X block: then shift,
    // scale, gate of the image-only attention; [batch, 3 * hidden] in a FLUX single-stream block: shift, scale,
    // gate of both streams); empty before the final layer.
    std::span<const float> modulation;
};
// Called before every block (after its modulation is computed) and once before the final layer. Returns the next
// block to run, in [next_layer, num_layers]: next_layer goes on; a larger value skips the blocks in between,
// num_layers goes straight to the final layer. Before the final layer it must return num_layers.
using boundary_fn = std::function<int(const block_boundary&)>;
// Sequence parallelism by K/V exchange (docs/scale-out.md): called at every layer and attention kind, right after
// the forward wrote the keys and values of the tokens it computes into `kv` and before any query reads them, so
// that the caller can bring in the rows other ranks computed (an all-gather per sample). Rank r then runs a
// token-subset forward over its shard and attends to every token's fresh keys and values.
using kv_exchange_fn = std::function<void(int layer, attention_kind kind, kv_cache& kv)>;
// Sequence parallelism by head exchange (DeepSpeed-Ulysses, docs/scale-out.md). Rank `rank` of `ranks` computes some
// image tokens of every sample (heads % P == 0 required); around each attention an all-to-all turns the q|k|v rows
// of its tokens (all heads) into the rows of every computed token of the rank's heads/P heads, and the attention's
// output back. Two forms:
//  - rank_tokens empty: a full forward, rank r computing its contiguous shard [r * T/P, (r + 1) * T/P) of every sample
//    (T % P == 0), exchanged by `all_to_all` (equal blocks, as MPI_Alltoall: block q of send goes to rank q, block r
//    of recv came from rank r);
//  - rank_tokens set (SpecDiff's partial forward): every rank's image_tokens of the call, [rank] -> [batch * m_r]
//    ascending ids per sample (m_r >= 0, the lists disjoint), the same on every rank; this rank's entry is its
//    image_tokens (image_selection::none when it is empty). The rows are exchanged by `all_to_all_v` (per-rank counts,
//    as MPI_Alltoallv); every rank runs the attention of its heads for every computed token, a rank with no token
//    of its own included. The other tokens' keys and values come from `kv`, a kv_cache of the rank's heads
//    (kv_cache(net, batch, tokens, ranks)), written at the computed tokens first. Without `kv` the lists must be
//    every token in rank order (a full forward of uneven shards: T % P need not be 0).
// The context stream is replicated (every rank computes it; its q|k|v are sliced by head locally and its attention
// output gathered over heads by one more `all_to_all`). `kv`, when set, receives every computed token's keys and
// values of the rank's heads (a full forward fills it for later partial ones); `kv_exchange` must be unset. Every
// rank must make the same calls with the same hooks. The attention probe then holds this rank's partial sums over its
// heads (averaged over all heads): sum it over the ranks.
using all_to_all_fn = std::function<void(std::span<const float> send, std::span<float> recv)>;
// send: P blocks, block q of send_counts[q] floats going to rank q; recv: P blocks, block r of recv_counts[r] floats
// from rank r (specdiff::all_to_all_communicator's all_to_all_v).
using all_to_all_v_fn = std::function<void(std::span<const float> send, std::span<const std::int32_t> send_counts,
                                           std::span<float> recv, std::span<const std::int32_t> recv_counts)>;
struct head_exchange {
    int rank = 0;
    int ranks = 1;
    all_to_all_fn all_to_all;  // empty: no head exchange
    std::span<const std::span<const std::int32_t>> rank_tokens = {};  // empty: contiguous shards (see above)
    all_to_all_v_fn all_to_all_v = {};                                 // required with rank_tokens
    explicit operator bool() const noexcept { return static_cast<bool>(all_to_all); }
};

// What a forward's image_tokens select: `listed` = the ids in image_tokens, every token when it is empty (the
// default); `none` = no image token at all, image_tokens empty (a Ulysses rank whose share of a token subset is
// empty: it still runs the attention of its heads for the other ranks' tokens; refused without ulysses.rank_tokens).
enum class image_selection : std::uint8_t { listed = 0, none = 1 };

struct forward_options {
    // Token-subset forward: [batch * n] ascending absolute image-token ids per sample, n the same for every
    // sample. Empty = every token (select = image_selection::none: no token). With a subset, `velocity` receives [batch, n, patch_features] rows
    // (features ordered (p, q, c) like proj_out) instead of the image, and `kv` is required.
    std::span<const std::int32_t> image_tokens;
    // Per-layer K/V of all image tokens. A forward refreshes the rows of the tokens it computes (all tokens in
    // a full forward); a subset forward reads the other rows. Layers whose attention is reused leave it as is.
    // Under ulysses: the rank's heads only (kv_cache with head_ranks = ulysses.ranks).
    kv_cache* kv = nullptr;
    // [batch, image tokens]: overwritten with, per image token, the column sum over the computed queries of
    // the head-averaged attention probabilities, summed over all layers that computed attention.
    std::span<float> attention_probe;
    bool probe_context_queries = false;  // also count the context tokens' queries (default: image queries only)
    // Empty, or one entry per block (transformer::blocks(): FLUX's double-stream blocks, then its single-stream
    // ones). SD3's last block (context_pre_only) has no context outputs: its context hooks must stay
    // {compute, nullptr}.
    std::span<const block_hooks> blocks;
    // Empty, or the step-level caching callback (block_boundary). Its calls do not allocate; a return value
    // outside its range throws std::logic_error (the forward stops there).
    boundary_fn between_blocks;
    // Empty, or the K/V exchange of a sequence-parallel forward (kv_exchange_fn); needs `kv`.
    kv_exchange_fn kv_exchange;
    // Unset, or the head exchange of a Ulysses sequence-parallel forward (head_exchange): image_tokens are then this
    // rank's shard, or its entry of ulysses.rank_tokens (a token subset: SpecDiff's partial forward).
    head_exchange ulysses;
    // image_selection::none: a forward of zero image tokens (image_tokens empty; Ulysses with rank_tokens only).
    image_selection select = image_selection::listed;
};

// The module sites of a block (the block_hooks entries it accepts), for methods that cache them.
struct block_sites {
    bool context_outputs = true;        // false: SD3's last block (context_pre_only): its context hooks stay {compute, nullptr}
    bool image_only_attention = false;  // MMDiT-X: block_hooks::attention2
    bool single_stream = false;         // FLUX single-stream block (module_hook: its sites are proj_out's two halves)
};

class transformer {
public:
    // `m` must outlive the transformer. threads in [1, max_threads]: the team of every stage (sd3::workers; the
    // caller's thread is one of them).
    // Workspaces are sized here from `limits`; their total is checked against the machine's memory first, and
    // limits whose workspaces would not fit are refused (std::invalid_argument stating the bytes needed).
    explicit transformer(const model& m, const engine_limits& limits = {}, int threads = 1);
    // A FLUX engine: limits.max_height and max_width (the token grid) are required; patch_size must be 1 (the
    // pipeline packs the latents itself, as every released FLUX config does).
    transformer(const flux_model& m, const engine_limits& limits, int threads = 1);
    ~transformer();
    transformer(transformer&&) noexcept;
    transformer& operator=(transformer&&) noexcept;

    architecture arch() const noexcept;
    // The SD3 model's config; on a FLUX engine throws std::logic_error (use flux()).
    const transformer_config& config() const;
    // The FLUX model's config; on an SD3 engine throws std::logic_error.
    const sd3::flux_config& flux() const;
    // Blocks a forward runs, one block_hooks entry and one kv_cache slot each: num_layers (SD3), or
    // num_layers + num_single_layers (FLUX).
    int blocks() const noexcept;
    // What a caching method needs to know of the network, whatever the architecture:
    block_sites sites(int layer) const;            // throws std::out_of_range outside [0, blocks())
    int hidden() const noexcept;                   // the width of every hook row
    int patch_features() const noexcept;           // floats of a velocity row per image token
    int image_tokens(int height, int width) const noexcept;  // tokens of a forward_inputs height x width
    // A full forward's velocity <-> its token rows [batch, tokens, patch_features] in token order: SD3's
    // image_to_patches / patches_to_image; a FLUX velocity already is the rows (a copy).
    void velocity_to_rows(int batch, int height, int width, std::span<const float> velocity, std::span<float> rows) const;
    void rows_to_velocity(int batch, int height, int width, std::span<const float> rows, std::span<float> velocity) const;
    const engine_limits& limits() const noexcept;
    int threads() const noexcept;
    void set_threads(int threads);
    // The transformer's team, for a caller's own loops between forwards (e.g. a method's cache fills), so that
    // they run on the same threads and do not start a second team competing for the cores.
    workers& team() noexcept;
    // The least work worth a chunk (default_min_chunk_work); 0 splits every loop (tests of the parallel paths).
    void set_min_chunk_work(double multiply_adds);

    // Full forward: velocity [batch, out_channels, height, width] (SD3), [batch, height * width, patch_features]
    // (FLUX: the output sequence, as FluxTransformer2DModel returns it).
    void forward(const forward_inputs& in, std::span<float> velocity);
    // Hooked forward (see forward_options). With no subset and no overrides it is bit-identical to the above.
    void forward(const forward_inputs& in, std::span<float> velocity, const forward_options& options);

private:
    struct impl;
    std::unique_ptr<impl> impl_;
};

// Image [batch, channels, height, width] <-> token rows [batch, n, p*p*channels] ((p, q, c) feature order).
// tokens: [batch * n] absolute token ids per sample (empty = all tokens, n = (height/p)*(width/p)).
void patches_to_image(const transformer_config& config, int batch, int height, int width, int channels,
                      std::span<const std::int32_t> tokens, std::span<const float> rows, std::span<float> image);
void image_to_patches(const transformer_config& config, int batch, int height, int width, int channels,
                      std::span<const std::int32_t> tokens, std::span<const float> image, std::span<float> rows);

}  // namespace sd3
