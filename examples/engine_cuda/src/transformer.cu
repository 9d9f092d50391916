// The device forward: the CPU engine's stages (examples/engine/src/transformer.cpp) in the same order, each a
// cuBLAS GEMM (fp32 accumulation, fp32 output) followed by the kernel that applies its epilogue (bias, activation,
// qk-norm, gated residual) and writes the next operand in the engine's precision. Weights live in one device
// allocation, workspaces in another, both made in the constructor; a forward only enqueues.
#include "sd3/cuda/transformer.hpp"

#include <cublas_v2.h>
#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

#include <specdiff/cuda/error.cuh>
#include <specdiff/cuda/lse.cuh>
#include <specdiff/cuda/views.cuh>

#include "attention.cuh"
#include "attention_fa2.cuh"
#include "cublas_check.hpp"
#include "device_array.hpp"
#include "kernels.cuh"
#include "sd3/errors.hpp"

namespace sd3::gpu {

const char* name(precision p) noexcept { return p == precision::bf16 ? "bf16" : "fp32"; }

namespace {

using specdiff::gpu::detail::blocks_for;
using specdiff::gpu::detail::workspace_layout;
using bytes_on_device = detail::device_array<unsigned char>;

template <class... Parts>
[[noreturn]] void fail(const Parts&... parts) {
    throw std::invalid_argument(message(parts...));
}

std::size_t element_bytes(precision p) { return p == precision::bf16 ? 2 : 4; }

// A linear layer on the device: weight [out][in] in the engine's precision, bias [out] fp32 (offsets into the
// weight allocation until it exists).
struct device_linear {
    std::size_t weight = 0, bias = 0;
    int in = 0, out = 0;
};

struct device_block {
    bool context_pre_only = false;
    device_linear norm1, norm1_context, to_qkv, add_qkv, to_out, to_add_out, ff1, ff2, ff_context1, ff_context2;
    std::size_t norm_q = 0, norm_k = 0, norm_added_q = 0, norm_added_k = 0;  // fp32 [head_dim]; 0 without qk-norm
};

// The model's tensors in one host image, each at a 256-byte aligned offset, uploaded in one copy.
class weight_image {
public:
    explicit weight_image(precision type) : type_(type) {}
    std::size_t floats(const float* src, std::size_t n) {
        const std::size_t at = reserve(n * 4);
        std::memcpy(bytes_.data() + at, src, n * 4);
        return at;
    }
    std::size_t operands(const float* src, std::size_t n) {
        if (type_ == precision::fp32) return floats(src, n);
        const std::size_t at = reserve(n * 2);
        auto* dst = reinterpret_cast<__nv_bfloat16*>(bytes_.data() + at);
        for (std::size_t i = 0; i < n; ++i) dst[i] = __float2bfloat16_rn(src[i]);  // round to nearest even, once
        return at;
    }
    device_linear linear(const sd3::linear& l, const std::vector<float>* permuted_weight = nullptr) {
        const std::vector<float>& w = permuted_weight ? *permuted_weight : l.weight;
        return {operands(w.data(), w.size()), floats(l.bias.data(), l.bias.size()), l.in, l.out};
    }
    std::size_t vector(const std::vector<float>& v) { return v.empty() ? 0 : floats(v.data(), v.size()); }
    const std::vector<unsigned char>& bytes() const { return bytes_; }

private:
    std::size_t reserve(std::size_t n) {
        const std::size_t at = (bytes_.size() + workspace_layout::alignment - 1) / workspace_layout::alignment * workspace_layout::alignment;
        bytes_.resize(at + n);
        return at;
    }
    precision type_;
    std::vector<unsigned char> bytes_ = std::vector<unsigned char>(workspace_layout::alignment);  // offset 0 = "none"
};

}  // namespace

// ---------------------------------------------------------------------------------------------------------------

// One stream's activations for forwards of one transformer, sized from its limits, laid out in one allocation
// (offsets first, then pointers), and the cuBLAS handle with a workspace of its own.
struct workspace::impl {
    const transformer::impl* owner;
    bytes_on_device work;
    std::size_t bytes = 0;
    struct buffers {
        void *tproj, *small, *pooled, *silu_temb, *context, *patches, *nrm_img, *nrm_ctx, *q_img, *q_ctx, *k_ctx, *v_ctx, *k_img, *v_img,
            *att_img, *att_ctx, *hidden;
        float *time_out, *text_out, *small_f, *mod_img, *mod_ctx, *mod_final, *x_img, *x_ctx, *y_img, *y_ctx, *lse;
        void* lse_ws;
        void* blas_ws;
        float *fa2_out, *fa2_lse, *fa2_probe;  // split-KV partials and per-head probe sums (bf16, head 64 / 128 only)
        unsigned* status;
    } buf{};
    std::size_t lse_ws_bytes = 0;
    cublasHandle_t blas = nullptr;

    explicit impl(const transformer::impl& net);
    impl(const impl&) = delete;
    impl& operator=(const impl&) = delete;
    ~impl() {
        if (blas) cublasDestroy(blas);
    }
};

struct transformer::impl {
    transformer_config config;
    precision type;
    device_limits limits;
    int D = 0, heads = 0, hd = 0, F = 0, P = 0, K = 0;
    int multiprocessors = 1;  // of the current device at construction: the split-KV heuristic's
    bool fa2 = false;         // bf16 with head size 64 or 128: the FlashAttention-2-class path exists

    // weights
    bytes_on_device weights;
    std::size_t weights_bytes = 0;
    device_linear patch_embed, time1, time2, text1, text2, context_embedder, norm_out, proj_out;
    std::size_t pos_table = 0;
    std::vector<device_block> blocks;

    impl(const model& m, precision t, const device_limits& l);
    void upload(const model& m);
    void validate(const forward_inputs& in, const float* velocity, const forward_options& o, const workspace& w) const;
    template <class T>
    void run(const forward_inputs& in, float* velocity, const forward_options& o, workspace::impl& w, cudaStream_t stream) const;

    template <class U = void>
    U* weight_at(std::size_t offset) const {
        return offset ? reinterpret_cast<U*>(weights.get() + offset) : nullptr;
    }
};

namespace {

// Y[rows][out] (fp32, leading dimension ldy) = X[rows][in] (T, ldx) · Wᵀ, W [out][in] row-major (torch's layout):
// in cuBLAS's column-major terms Yᵀ = op(W')·X' with W' = the row-major W read as in x out, transposed.
template <class T>
void gemm(cublasHandle_t h, const void* x, int ldx, int rows, const void* w, int in, int out, float* y, int ldy) {
    if (rows == 0) return;
    constexpr cudaDataType operand = std::is_same_v<T, float> ? CUDA_R_32F : CUDA_R_16BF;
    const float one = 1.f, zero = 0.f;
    SD3_CUBLAS_CHECK(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, out, rows, in, &one, w, operand, in, x, operand, ldx, &zero, y, CUDA_R_32F, ldy,
                                  CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

constexpr unsigned threads = 256;
// Split over keys: at most this many splits, and only when a sample has at most this many queries (a partial step),
// which bounds the partials' workspace: max_splits x batch x heads x split_query_limit x (head_dim + 1) floats.
constexpr int max_splits = 4, split_query_limit = 1024;
constexpr std::size_t blas_workspace_bytes = std::size_t{32} << 20;  // NVIDIA's recommendation for Hopper

}  // namespace

transformer::impl::impl(const model& m, precision t, const device_limits& l) : config(m.config), type(t), limits(l) {
    config.validate();  // before any product of its fields
    if (t != precision::fp32 && t != precision::bf16) fail("sd3::gpu::transformer: precision = ", static_cast<int>(t), " is not fp32 (0) or bf16 (1)");
    D = config.hidden();
    heads = config.num_attention_heads;
    hd = config.attention_head_dim;
    P = config.patch_features();
    K = config.patch_inputs();
    if (!config.dual_attention_layers.empty())
        fail("sd3::gpu::transformer: dual_attention_layers has ", config.dual_attention_layers.size(),
             " entries; MMDiT-X's second attention runs on the CPU engine only");
    if (!detail::attention_head_dim_supported(hd))
        fail("sd3::gpu::transformer: attention_head_dim = ", hd, "; the attention kernel is built for 8, 16, 32, 64 and 128");
    const int side = config.pos_embed_max_size;  // validate() bounds it by 4096: its square fits in int
    if (limits.max_image_tokens == 0) {
        const long long trained = static_cast<long long>(config.sample_size / config.patch_size) * (config.sample_size / config.patch_size);
        if (trained > static_cast<long long>(side) * side)
            fail("sd3::gpu::transformer: limits.max_image_tokens = 0 means (sample_size / patch_size)^2 = ", trained,
                 " tokens, more than the position table's ", side, " x ", side, " cells: give it explicitly");
        limits.max_image_tokens = static_cast<int>(trained);
    }
    if (limits.max_batch < 1) fail("sd3::gpu::transformer: limits.max_batch = ", limits.max_batch, " must be >= 1");
    if (limits.max_image_tokens < 1) fail("sd3::gpu::transformer: limits.max_image_tokens = ", limits.max_image_tokens, " must be >= 1");
    if (limits.max_context_tokens < 1) fail("sd3::gpu::transformer: limits.max_context_tokens = ", limits.max_context_tokens, " must be >= 1");
    if (limits.max_image_tokens > side * side)
        fail("sd3::gpu::transformer: limits.max_image_tokens = ", limits.max_image_tokens, " exceeds the position table's ", side, " x ", side,
             " cells");
    m.validate();  // every weight's size against the config (the CPU engine's check)
    fa2 = type == precision::bf16 && (hd == 64 || hd == 128);
    F = m.blocks.front().ff1.out;
    // Row counts are int in the kernels (elements are indexed in size_t), and the largest workspace buffer's bytes
    // must be a size_t: refused by name before anything is allocated.
    (void)specdiff::detail::checked_product<int>("limits.max_batch * (max_image_tokens + max_context_tokens)", limits.max_batch,
                                                 static_cast<long long>(limits.max_image_tokens) + limits.max_context_tokens);
    (void)specdiff::detail::checked_product<std::size_t>("limits.max_batch * max(max_image_tokens, max_context_tokens) * max(3 * hidden, ff width) * 4 bytes",
                                                         limits.max_batch, std::max(limits.max_image_tokens, limits.max_context_tokens),
                                                         std::max(3 * D, F), 4);
    upload(m);
    int device = 0;
    SPECDIFF_CUDA_CHECK(cudaGetDevice(&device));
    SPECDIFF_CUDA_CHECK(cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, device));
    if (fa2) SPECDIFF_CUDA_CHECK(detail::fa2::prepare(hd));
}

void transformer::impl::upload(const model& m) {
    weight_image image(type);
    // The patch embedding reads latent token rows, features (u, v, c); the conv weight is (c, u, v): permute its
    // columns once here.
    const int p = config.patch_size, C = config.in_channels;
    std::vector<float> permuted(m.patch_embed.weight.size());
    for (int o = 0; o < D; ++o)
        for (int c = 0; c < C; ++c)
            for (int u = 0; u < p; ++u)
                for (int v = 0; v < p; ++v)
                    permuted[static_cast<std::size_t>(o) * K + (u * p + v) * C + c] = m.patch_embed.weight[static_cast<std::size_t>(o) * K + (c * p + u) * p + v];
    patch_embed = image.linear(m.patch_embed, &permuted);
    pos_table = image.vector(m.pos_table);
    time1 = image.linear(m.time_linear1);
    time2 = image.linear(m.time_linear2);
    text1 = image.linear(m.text_linear1);
    text2 = image.linear(m.text_linear2);
    context_embedder = image.linear(m.context_embedder);
    norm_out = image.linear(m.norm_out);
    proj_out = image.linear(m.proj_out);
    for (const auto& b : m.blocks) {
        device_block d;
        d.context_pre_only = b.context_pre_only;
        d.norm1 = image.linear(b.norm1);
        d.norm1_context = image.linear(b.norm1_context);
        d.to_qkv = image.linear(b.to_qkv);
        d.add_qkv = image.linear(b.add_qkv);
        d.to_out = image.linear(b.to_out);
        d.ff1 = image.linear(b.ff1);
        d.ff2 = image.linear(b.ff2);
        if (!b.context_pre_only) {
            d.to_add_out = image.linear(b.to_add_out);
            d.ff_context1 = image.linear(b.ff_context1);
            d.ff_context2 = image.linear(b.ff_context2);
        }
        d.norm_q = image.vector(b.norm_q);
        d.norm_k = image.vector(b.norm_k);
        d.norm_added_q = image.vector(b.norm_added_q);
        d.norm_added_k = image.vector(b.norm_added_k);
        blocks.push_back(d);
    }
    weights_bytes = image.bytes().size();
    weights = detail::upload(std::span<const unsigned char>(image.bytes()));
}

workspace::impl::impl(const transformer::impl& net) : owner(&net) {
    const auto& limits = net.limits;
    const auto& config = net.config;
    const int D = net.D, F = net.F, K = net.K, heads = net.heads, hd = net.hd;
    const std::size_t e = element_bytes(net.type), f = sizeof(float);
    const std::size_t B = static_cast<std::size_t>(limits.max_batch), N = static_cast<std::size_t>(limits.max_image_tokens),
                      L = static_cast<std::size_t>(limits.max_context_tokens), d = static_cast<std::size_t>(D);
    const std::size_t wide = std::max<std::size_t>(3 * d, static_cast<std::size_t>(F));
    workspace_layout layout;
    std::vector<std::function<void(unsigned char*)>> place;  // sets each pointer once the allocation exists
    auto add = [&]<class P>(P*& p, std::size_t bytes) {
        place.push_back([&p, offset = layout.add(bytes)](unsigned char* base) { p = reinterpret_cast<P*>(base + offset); });
    };
    add(buf.tproj, B * 256 * e);
    add(buf.small, B * d * e);
    add(buf.pooled, B * static_cast<std::size_t>(config.pooled_projection_dim) * e);
    add(buf.silu_temb, B * d * e);
    add(buf.context, B * L * static_cast<std::size_t>(config.joint_attention_dim) * e);
    add(buf.patches, B * N * static_cast<std::size_t>(K) * e);
    add(buf.nrm_img, B * N * d * e);
    add(buf.nrm_ctx, B * L * d * e);
    add(buf.q_img, B * N * d * e);
    add(buf.q_ctx, B * L * d * e);
    add(buf.k_ctx, B * L * d * e);
    add(buf.v_ctx, B * L * d * e);
    add(buf.k_img, B * N * d * e);
    add(buf.v_img, B * N * d * e);
    add(buf.att_img, B * N * d * e);
    add(buf.att_ctx, B * L * d * e);
    add(buf.hidden, B * std::max(N, L) * static_cast<std::size_t>(F) * e);
    add(buf.time_out, B * d * f);
    add(buf.text_out, B * d * f);
    add(buf.small_f, B * d * f);
    add(buf.mod_img, B * 6 * d * f);
    add(buf.mod_ctx, B * 6 * d * f);
    add(buf.mod_final, B * 2 * d * f);
    add(buf.x_img, B * N * d * f);
    add(buf.x_ctx, B * L * d * f);
    add(buf.y_img, B * N * wide * f);
    add(buf.y_ctx, B * std::max<std::size_t>(L, 1) * wide * f);
    add(buf.lse, B * static_cast<std::size_t>(heads) * (N + L) * f);
    add(buf.status, sizeof(unsigned));
    // The LSE column sums' workspace, sized by its own query (two-phase, as CUB) for the largest layer.
    // (A size query reads shapes only.)
    const specdiff::gpu::device_qk_rows<float> rows{nullptr, limits.max_batch, heads, limits.max_image_tokens, hd};
    const specdiff::gpu::device_lse_attention<float> largest{rows, rows, {}, 1.f};
    specdiff::gpu::lse_column_sums(nullptr, lse_ws_bytes, largest, {}, specdiff::column_mode::overwrite, nullptr);
    add(buf.lse_ws, lse_ws_bytes);
    add(buf.blas_ws, blas_workspace_bytes);
    const std::size_t split_rows = net.fa2 ? B * static_cast<std::size_t>(heads) * std::min<std::size_t>(N + L, split_query_limit) * max_splits : 0;
    add(buf.fa2_out, split_rows * static_cast<std::size_t>(hd) * f);
    add(buf.fa2_lse, split_rows * f);
    add(buf.fa2_probe, net.fa2 ? B * static_cast<std::size_t>(heads) * N * f : 0);
    bytes = layout.bytes();
    work = bytes_on_device(bytes);
    for (const auto& set : place) set(work.get());
    SPECDIFF_CUDA_CHECK(cudaMemset(buf.status, 0, sizeof(unsigned)));
    SD3_CUBLAS_CHECK(cublasCreate(&blas));
    // The handle's workspace (buf.blas_ws) is set in every forward, after its cublasSetStream (which drops it).
}

void transformer::impl::validate(const forward_inputs& in, const float* velocity, const forward_options& o, const workspace& w) const {
    const char* fn = "sd3::gpu::transformer::forward: ";
    if (!w.impl_) fail(fn, "the workspace is empty (moved from)");
    if (w.impl_->owner != this) fail(fn, "the workspace was made for another transformer");
    if (in.batch < 1 || in.batch > limits.max_batch) fail(fn, "batch = ", in.batch, " outside [1, ", limits.max_batch, "] (limits.max_batch)");
    const int side = config.pos_embed_max_size;
    if (in.grid_height < 1 || in.grid_height > side) fail(fn, "grid_height = ", in.grid_height, " outside [1, ", side, "] (the position table's side)");
    if (in.grid_width < 1 || in.grid_width > side) fail(fn, "grid_width = ", in.grid_width, " outside [1, ", side, "] (the position table's side)");
    const long long tokens = static_cast<long long>(in.grid_height) * in.grid_width;
    if (tokens > limits.max_image_tokens)
        fail(fn, "grid_height x grid_width = ", in.grid_height, " x ", in.grid_width, " = ", tokens, " image tokens exceed limits.max_image_tokens = ",
             limits.max_image_tokens);
    if (in.context_tokens < 1 || in.context_tokens > limits.max_context_tokens)
        fail(fn, "context_tokens = ", in.context_tokens, " outside [1, ", limits.max_context_tokens, "] (limits.max_context_tokens)");
    if (in.latent_batch < 0) fail(fn, "latent_batch = ", in.latent_batch, " is negative");
    if (!std::isfinite(in.timestep)) fail(fn, "timestep = ", in.timestep, " is not finite");
    if (!in.latent_rows) fail(fn, "latent_rows is null");
    if (!in.context) fail(fn, "context is null");
    if (!in.pooled) fail(fn, "pooled is null");
    if (!velocity) fail(fn, "velocity is null");
    const int N = static_cast<int>(tokens);
    if (o.image_tokens) {
        if (o.tokens_per_sample < 1 || o.tokens_per_sample > N)
            fail(fn, "options.tokens_per_sample = ", o.tokens_per_sample, " outside [1, ", N, "] (the image tokens)");
        if (!o.kv) fail(fn, "options.kv is null: a token-subset forward reads the other tokens' keys and values from it");
    } else if (o.tokens_per_sample != 0) {
        fail(fn, "options.tokens_per_sample = ", o.tokens_per_sample, " without options.image_tokens");
    }
    if (o.probe_query_step < 1) fail(fn, "options.probe_query_step = ", o.probe_query_step, " must be >= 1");
    if (o.kv) {
        const kv_cache& kv = *o.kv;
        if (kv.layers() != config.num_layers || kv.hidden() != D || kv.type() != type)
            fail(fn, "options.kv holds ", kv.layers(), " layers of ", kv.hidden(), " ", name(kv.type()), " values; this transformer needs ",
                 config.num_layers, " of ", D, " ", name(type));
        if (kv.batch() != in.batch || kv.image_tokens() != N)
            fail(fn, "options.kv is sized for ", kv.batch(), " samples x ", kv.image_tokens(), " tokens; this forward has ", in.batch, " x ", N);
    }
}

template <class T>
void transformer::impl::run(const forward_inputs& in, float* velocity, const forward_options& o, workspace::impl& ws, cudaStream_t stream) const {
    using detail::activation;
    auto& buf = ws.buf;
    cublasHandle_t blas = ws.blas;
    const std::size_t lse_ws_bytes = ws.lse_ws_bytes;
    const int B = in.batch, Wg = in.grid_width, N = in.grid_height * in.grid_width, L = in.context_tokens;
    const std::int32_t* ids = o.image_tokens;
    const int n = ids ? o.tokens_per_sample : N;
    const int latent_batch = in.latent_batch ? in.latent_batch : B;
    const int img = B * n, ctx = B * L;  // rows of each stream
    auto as_t = [](void* p) { return static_cast<T*>(p); };
    // cublasSetStream resets the handle's workspace to cuBLAS's own pool, unconditionally (cuBLAS documentation,
    // cublasSetStream), so the workspace's buffer is set again right after it, in every forward: cuBLAS then
    // allocates nothing during a forward, and a forward captured into a graph before any eager GEMM replays.
    SD3_CUBLAS_CHECK(cublasSetStream(blas, stream));
    SD3_CUBLAS_CHECK(cublasSetWorkspace(blas, buf.blas_ws, blas_workspace_bytes));
    auto w = [&](const device_linear& l) { return weight_at(l.weight); };
    auto b = [&](const device_linear& l) { return weight_at<const float>(l.bias); };
    auto launched = [](const char* kernel) { specdiff::gpu::check(cudaGetLastError(), kernel, __FILE__, __LINE__); };
    // y (fp32) + bias -> act -> out (T or fp32), rows x cols
    auto epilogue = [&]<activation A, class O>(const float* y, int ldy, const device_linear& l, O* out, int ldo, int rows) {
        const std::size_t total = static_cast<std::size_t>(rows) * l.out;
        if (total == 0) return;
        detail::bias_activation_kernel<A, O><<<blocks_for(total, threads), threads, 0, stream>>>(y, ldy, b(l), out, ldo, rows, l.out);
        launched("bias_activation_kernel");
    };
    auto linear = [&](const void* x, int rows, const device_linear& l, float* y) { gemm<T>(blas, x, l.in, rows, w(l), l.in, l.out, y, l.out); };
    auto norm = [&](const float* x, int rows, int per, const float* mod, int stride, int shift_at, int scale_at, void* out) {
        if (rows == 0) return;
        detail::norm_modulate_kernel<T><<<rows, threads, 0, stream>>>(x, D, per, mod, stride, shift_at, scale_at, as_t(out));
        launched("norm_modulate_kernel");
    };
    auto residual = [&](float* x, const float* y, const device_linear& l, const float* mod, int stride, int gate_at, int per, int rows) {
        const std::size_t total = static_cast<std::size_t>(rows) * D;
        if (total == 0) return;
        detail::gated_residual_kernel<><<<blocks_for(total, threads), threads, 0, stream>>>(x, y, b(l), mod, stride, gate_at, per, rows, D);
        launched("gated_residual_kernel");
    };

    if (ids) {
        detail::check_tokens_kernel<><<<blocks_for(static_cast<std::size_t>(img), threads), threads, 0, stream>>>(ids, n, img, N, buf.status);
        launched("check_tokens_kernel");
    }

    // Conditioning: temb = timestep MLP + pooled MLP; silu_temb feeds every AdaLN linear.
    detail::timestep_kernel<T><<<blocks_for(static_cast<std::size_t>(B) * 256, threads), threads, 0, stream>>>(in.timestep, as_t(buf.tproj), B);
    launched("timestep_kernel");
    linear(buf.tproj, B, time1, buf.small_f);
    epilogue.template operator()<activation::silu, T>(buf.small_f, D, time1, as_t(buf.small), D, B);
    linear(buf.small, B, time2, buf.time_out);
    epilogue.template operator()<activation::none, float>(buf.time_out, D, time2, buf.time_out, D, B);
    const std::size_t pooled = static_cast<std::size_t>(B) * config.pooled_projection_dim;
    detail::convert_kernel<T><<<blocks_for(pooled, threads), threads, 0, stream>>>(in.pooled, as_t(buf.pooled), pooled);
    launched("convert_kernel");
    linear(buf.pooled, B, text1, buf.small_f);
    epilogue.template operator()<activation::silu, T>(buf.small_f, D, text1, as_t(buf.small), D, B);
    linear(buf.small, B, text2, buf.text_out);
    epilogue.template operator()<activation::none, float>(buf.text_out, D, text2, buf.text_out, D, B);
    detail::sum_silu_kernel<T><<<blocks_for(static_cast<std::size_t>(B) * D, threads), threads, 0, stream>>>(buf.time_out, buf.text_out,
                                                                                                              as_t(buf.silu_temb), B * D);
    launched("sum_silu_kernel");

    // Context tokens: context_embedder.
    const std::size_t context = static_cast<std::size_t>(ctx) * config.joint_attention_dim;
    detail::convert_kernel<T><<<blocks_for(context, threads), threads, 0, stream>>>(in.context, as_t(buf.context), context);
    launched("convert_kernel");
    linear(buf.context, ctx, context_embedder, buf.x_ctx);
    epilogue.template operator()<activation::none, float>(buf.x_ctx, D, context_embedder, buf.x_ctx, D, ctx);

    // Image tokens: the patch embedding of the listed tokens' latent rows, + the cropped position table.
    const int side = config.pos_embed_max_size, top = (side - in.grid_height) / 2, left = (side - in.grid_width) / 2;
    const std::size_t patches = static_cast<std::size_t>(img) * K;
    detail::gather_patches_kernel<T><<<blocks_for(patches, threads), threads, 0, stream>>>(in.latent_rows, latent_batch, N, K, ids, n, img,
                                                                                          as_t(buf.patches));
    launched("gather_patches_kernel");
    linear(buf.patches, img, patch_embed, buf.y_img);
    detail::patch_position_kernel<><<<blocks_for(static_cast<std::size_t>(img) * D, threads), threads, 0, stream>>>(
        buf.y_img, b(patch_embed), weight_at<const float>(pos_table), side, top, left, Wg, N, ids, n, img, D, buf.x_img);
    launched("patch_position_kernel");

    const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
    const int warps_per_block = static_cast<int>(threads / 32);
    for (int l = 0; l < config.num_layers; ++l) {
        const device_block& k = blocks[static_cast<std::size_t>(l)];
        const bool context_out = !k.context_pre_only;
        const int ctx_stride = k.norm1_context.out;
        linear(buf.silu_temb, B, k.norm1, buf.mod_img);
        epilogue.template operator()<activation::none, float>(buf.mod_img, 6 * D, k.norm1, buf.mod_img, 6 * D, B);
        linear(buf.silu_temb, B, k.norm1_context, buf.mod_ctx);
        epilogue.template operator()<activation::none, float>(buf.mod_ctx, ctx_stride, k.norm1_context, buf.mod_ctx, ctx_stride, B);

        // Attention: norm + modulate (AdaLayerNormZero; the last block's context: AdaLayerNormContinuous, chunks
        // scale, shift), q | k | v with qk-norm, image keys and values into the cache slot, joint attention.
        norm(buf.x_img, img, n, buf.mod_img, 6 * D, 0, D, buf.nrm_img);
        norm(buf.x_ctx, ctx, L, buf.mod_ctx, ctx_stride, context_out ? 0 : D, context_out ? D : 0, buf.nrm_ctx);
        T* k_img = o.kv ? static_cast<T*>(o.kv->keys(l)) : as_t(buf.k_img);
        T* v_img = o.kv ? static_cast<T*>(o.kv->values(l)) : as_t(buf.v_img);
        linear(buf.nrm_img, img, k.to_qkv, buf.y_img);
        detail::qkv_kernel<T><<<blocks_for(static_cast<std::size_t>(img) * heads, warps_per_block), threads, 0, stream>>>(
            buf.y_img, b(k.to_qkv), weight_at<const float>(k.norm_q), weight_at<const float>(k.norm_k), img, heads, hd,
            detail::qkv_destination<T>{as_t(buf.q_img), k_img, v_img, ids, n, N});
        launched("qkv_kernel");
        linear(buf.nrm_ctx, ctx, k.add_qkv, buf.y_ctx);
        detail::qkv_kernel<T><<<blocks_for(static_cast<std::size_t>(ctx) * heads, warps_per_block), threads, 0, stream>>>(
            buf.y_ctx, b(k.add_qkv), weight_at<const float>(k.norm_added_q), weight_at<const float>(k.norm_added_k), ctx, heads, hd,
            detail::qkv_destination<T>{as_t(buf.q_ctx), as_t(buf.k_ctx), as_t(buf.v_ctx), nullptr, L, L});
        launched("qkv_kernel");
        const int ctx_queries = context_out ? L : 0;  // the last block's context outputs are not used
        detail::attention_args<T> a;
        a.heads = heads;
        a.hidden = D;
        a.scale = scale;
        a.q[0] = {as_t(buf.q_img), n, static_cast<long long>(n) * D};
        a.q[1] = {as_t(buf.q_ctx), ctx_queries, static_cast<long long>(L) * D};
        a.k[0] = {k_img, N, static_cast<long long>(N) * D};
        a.k[1] = {as_t(buf.k_ctx), L, static_cast<long long>(L) * D};
        a.v[0] = {v_img, N, static_cast<long long>(N) * D};
        a.v[1] = {as_t(buf.v_ctx), L, static_cast<long long>(L) * D};
        a.out[0] = as_t(buf.att_img);
        a.out[1] = as_t(buf.att_ctx);
        a.lse = buf.lse;
        bool fast_probe = false;
        if constexpr (std::is_same_v<T, __nv_bfloat16>) {
            if (fa2 && !o.reference_attention && detail::vector_aligned(a)) {
                const int queries = n + ctx_queries, key_tiles = (N + L + detail::fa2::block_keys - 1) / detail::fa2::block_keys;
                const long long blocks = static_cast<long long>((queries + detail::fa2::block_queries - 1) / detail::fa2::block_queries) * heads * B;
                const int splits = queries <= split_query_limit ? detail::fa2::choose_splits(blocks, multiprocessors, key_tiles, max_splits) : 1;
                const detail::fa2::split_args sp{.splits = splits, .batch = B, .partial_out = buf.fa2_out, .partial_lse = buf.fa2_lse};
                if (hd == 64) detail::fa2::launch<64>(a, B, sp, stream);
                else detail::fa2::launch<128>(a, B, sp, stream);
                launched("attention_fa2_kernel");
                fast_probe = o.probe_query_step == 1;
            } else {
                detail::launch_attention(a, B, hd, stream);
                launched("attention_kernel");
            }
        } else {
            detail::launch_attention(a, B, hd, stream);
            launched("attention_kernel");
        }
        if (o.attention_probe && fast_probe) {
            // The same sums on tensor cores (attention_fa2.cuh): one head per block, per-head partials summed in order.
            if constexpr (std::is_same_v<T, __nv_bfloat16>) {
                const detail::fa2::probe_args pa{.q = as_t(buf.q_img), .k = k_img, .lse = buf.lse, .partial = buf.fa2_probe, .n = n, .keys = N, .heads = heads,
                                                 .hidden = D, .lse_queries = n + ctx_queries, .q_sample_stride = static_cast<long long>(n) * D,
                                                 .k_sample_stride = static_cast<long long>(N) * D, .scale = scale};
                if (hd == 64) detail::fa2::launch_probe<64>(pa, B, l != 0, o.attention_probe, stream);
                else detail::fa2::launch_probe<128>(pa, B, l != 0, o.attention_probe, stream);
                launched("fa2_probe_kernel");
            }
        } else if (o.attention_probe) {
            // The attention each image token received from the computed image queries, from their LSE: no
            // probabilities stored (specdiff::gpu::lse_column_sums), summed over the layers.
            using key = std::conditional_t<std::is_same_v<T, float>, float, specdiff::bfloat16>;
            const auto* q_rows = reinterpret_cast<const key*>(buf.q_img);
            const auto* k_rows = reinterpret_cast<const key*>(k_img);
            const int queries = n + ctx_queries;
            const specdiff::gpu::device_lse_attention<key> layer{
                {q_rows, B, heads, n, hd, D, hd, static_cast<std::ptrdiff_t>(n) * D},
                {k_rows, B, heads, N, hd, D, hd, static_cast<std::ptrdiff_t>(N) * D},
                {buf.lse, 1, queries, static_cast<std::ptrdiff_t>(heads) * queries},
                scale};
            std::size_t bytes = lse_ws_bytes;
            const specdiff::gpu::device_span<float> out{o.attention_probe, static_cast<specdiff::index_t>(B) * N};
            const auto mode = l == 0 ? specdiff::column_mode::overwrite : specdiff::column_mode::accumulate;
            if (o.probe_query_step == 1) specdiff::gpu::lse_column_sums(buf.lse_ws, bytes, layer, out, mode, stream);
            else specdiff::gpu::lse_column_sums_estimate(buf.lse_ws, bytes, layer, o.probe_query_step, out, mode, stream);
        }
        linear(buf.att_img, img, k.to_out, buf.y_img);
        residual(buf.x_img, buf.y_img, k.to_out, buf.mod_img, 6 * D, 2 * D, n, img);
        if (context_out) {
            linear(buf.att_ctx, ctx, k.to_add_out, buf.y_ctx);
            residual(buf.x_ctx, buf.y_ctx, k.to_add_out, buf.mod_ctx, 6 * D, 2 * D, L, ctx);
        }

        // MLP (GELU, tanh approximation) of each stream with outputs.
        auto mlp = [&](float* x, int rows, int per, const float* mod, void* nrm, const device_linear& ff1, const device_linear& ff2, float* y) {
            norm(x, rows, per, mod, 6 * D, 3 * D, 4 * D, nrm);
            linear(nrm, rows, ff1, y);
            epilogue.template operator()<activation::gelu_tanh, T>(y, F, ff1, as_t(buf.hidden), F, rows);
            linear(buf.hidden, rows, ff2, y);
            residual(x, y, ff2, mod, 6 * D, 5 * D, per, rows);
        };
        mlp(buf.x_img, img, n, buf.mod_img, buf.nrm_img, k.ff1, k.ff2, buf.y_img);
        if (context_out) mlp(buf.x_ctx, ctx, L, buf.mod_ctx, buf.nrm_ctx, k.ff_context1, k.ff_context2, buf.y_ctx);
    }

    // Final layer: AdaLayerNormContinuous (chunks scale, shift), proj_out to the velocity rows.
    linear(buf.silu_temb, B, norm_out, buf.mod_final);
    epilogue.template operator()<activation::none, float>(buf.mod_final, 2 * D, norm_out, buf.mod_final, 2 * D, B);
    norm(buf.x_img, img, n, buf.mod_final, 2 * D, D, 0, buf.nrm_img);
    linear(buf.nrm_img, img, proj_out, velocity);
    epilogue.template operator()<activation::none, float>(velocity, P, proj_out, velocity, P, img);
}

// ---------------------------------------------------------------------------------------------------------------

transformer::transformer(const model& m, precision type, const device_limits& limits) : impl_(std::make_unique<impl>(m, type, limits)) {}
transformer::~transformer() = default;
transformer::transformer(transformer&&) noexcept = default;
transformer& transformer::operator=(transformer&&) noexcept = default;

const transformer_config& transformer::config() const noexcept { return impl_->config; }
precision transformer::type() const noexcept { return impl_->type; }
const device_limits& transformer::limits() const noexcept { return impl_->limits; }
int transformer::hidden() const noexcept { return impl_->D; }
int transformer::patch_features() const noexcept { return impl_->P; }
int transformer::patch_inputs() const noexcept { return impl_->K; }
std::size_t transformer::weight_bytes() const noexcept { return impl_->weights_bytes; }

void transformer::forward(const forward_inputs& in, float* velocity, const forward_options& options, workspace& w, cudaStream_t stream) const {
    impl_->validate(in, velocity, options, w);
    if (impl_->type == precision::bf16) impl_->run<__nv_bfloat16>(in, velocity, options, *w.impl_, stream);
    else impl_->run<float>(in, velocity, options, *w.impl_, stream);
}

// ---------------------------------------------------------------------------------------------------------------

workspace::workspace(const transformer& net) : impl_(std::make_unique<impl>(*net.impl_)) {}
workspace::~workspace() = default;
workspace::workspace(workspace&&) noexcept = default;
workspace& workspace::operator=(workspace&&) noexcept = default;
std::size_t workspace::bytes() const noexcept { return impl_ ? impl_->bytes : 0; }

unsigned workspace::read_status(cudaStream_t stream) const {
    if (!impl_) throw std::logic_error("sd3::gpu::workspace::read_status: the workspace is empty (moved from)");
    unsigned status = 0;
    SPECDIFF_CUDA_CHECK(cudaMemcpyAsync(&status, impl_->buf.status, sizeof status, cudaMemcpyDeviceToHost, stream));
    SPECDIFF_CUDA_CHECK(cudaStreamSynchronize(stream));
    return status;
}

// ---------------------------------------------------------------------------------------------------------------

namespace detail {
void device_free::operator()(void* p) const noexcept { cudaFree(p); }
void* allocate_device(std::size_t bytes) {
    void* p = nullptr;
    SPECDIFF_CUDA_CHECK(cudaMalloc(&p, bytes ? bytes : 1));
    return p;
}
}  // namespace detail

kv_cache::kv_cache(const transformer& net, int batch, int image_tokens)
    : layers_(net.config().num_layers), batch_(batch), tokens_(image_tokens), hidden_(net.hidden()), type_(net.type()) {
    if (batch < 1 || batch > net.limits().max_batch)
        fail("sd3::gpu::kv_cache: batch = ", batch, " outside [1, ", net.limits().max_batch, "] (the transformer's max_batch)");
    if (image_tokens < 1 || image_tokens > net.limits().max_image_tokens)
        fail("sd3::gpu::kv_cache: image_tokens = ", image_tokens, " outside [1, ", net.limits().max_image_tokens, "] (the transformer's max_image_tokens)");
    memory_.reset(detail::allocate_device(bytes()));
}
std::size_t kv_cache::bytes() const noexcept { return 2 * slot_bytes() * static_cast<std::size_t>(layers_); }
std::size_t kv_cache::slot_bytes() const noexcept {
    return static_cast<std::size_t>(batch_) * static_cast<std::size_t>(tokens_) * static_cast<std::size_t>(hidden_) * element_bytes(type_);
}
void* kv_cache::keys(int layer) const noexcept { return static_cast<unsigned char*>(memory_.get()) + 2 * static_cast<std::size_t>(layer) * slot_bytes(); }
void* kv_cache::values(int layer) const noexcept { return static_cast<unsigned char*>(keys(layer)) + slot_bytes(); }

}  // namespace sd3::gpu
