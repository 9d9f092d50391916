// compare_attention (attention_check.hpp): the FlashAttention-2-class kernel and the reference kernels against an
// fp64 host twin of the same bf16 inputs.
#include "attention_check.hpp"

#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <stdexcept>
#include <vector>

#include <specdiff/cuda/error.cuh>
#include <specdiff/cuda/lse.cuh>

#include "attention.cuh"
#include "attention_fa2.cuh"
#include "device_array.hpp"

namespace sd3::gpu::detail {

std::string attention_errors::describe() const {
    return "out: fa2 " + std::to_string(fa2_out) + ", reference " + std::to_string(reference_out) + "; lse: fa2 " + std::to_string(fa2_lse) +
           ", reference " + std::to_string(reference_lse) + "; probe: fa2 " + std::to_string(fa2_probe) + ", library " + std::to_string(library_probe) +
           "; splits " + std::to_string(splits_used);
}

namespace {

using bf16 = __nv_bfloat16;

struct host_segment {
    std::vector<bf16> values;  // [batch][rows][hidden]
    std::vector<double> exact;  // the same values as doubles
};

host_segment draw(int batch, int rows, int hidden, std::mt19937_64& rng) {
    std::normal_distribution<float> normal;
    host_segment s;
    const std::size_t n = static_cast<std::size_t>(batch) * rows * hidden;
    s.values.resize(n);
    s.exact.resize(n);
    for (std::size_t i = 0; i < n; ++i) {
        s.values[i] = __float2bfloat16_rn(normal(rng));
        s.exact[i] = static_cast<double>(__bfloat162float(s.values[i]));
    }
    return s;
}

template <class T>
device_array<T> to_device(const std::vector<T>& v) { return upload(std::span<const T>(v)); }

std::vector<float> download(const device_array<float>& d) {
    std::vector<float> h(d.n);
    SPECDIFF_CUDA_CHECK(cudaMemcpy(h.data(), d.get(), d.bytes(), cudaMemcpyDeviceToHost));
    return h;
}
std::vector<float> download_bf16(const device_array<bf16>& d) {
    std::vector<bf16> h(d.n);
    SPECDIFF_CUDA_CHECK(cudaMemcpy(h.data(), d.get(), d.bytes(), cudaMemcpyDeviceToHost));
    std::vector<float> f(h.size());
    for (std::size_t i = 0; i < h.size(); ++i) f[i] = __bfloat162float(h[i]);
    return f;
}

}  // namespace

attention_errors compare_attention(const attention_case& c) {
    if (c.head_dim != 64 && c.head_dim != 128)
        throw std::invalid_argument("compare_attention: head_dim = " + std::to_string(c.head_dim) + " (the fa2 kernel is built for 64 and 128)");
    if (c.batch < 1 || c.heads < 1 || c.image_queries < 1 || c.context_queries < 0 || c.image_keys < 1 || c.context_keys < 0 || c.splits < 1)
        throw std::invalid_argument("compare_attention: sizes must be positive (context ones >= 0), splits >= 1");
    const int B = c.batch, H = c.heads, hd = c.head_dim, D = H * hd;
    const int nq = c.image_queries, lq = c.context_queries, nk = c.image_keys, lk = c.context_keys;
    const int queries = nq + lq, keys = nk + lk;
    const float scale = c.logit_scale / std::sqrt(static_cast<float>(hd));
    std::mt19937_64 rng(c.seed);
    const auto qi = draw(B, nq, D, rng), qc = draw(B, lq, D, rng), ki = draw(B, nk, D, rng), kc = draw(B, lk, D, rng), vi = draw(B, nk, D, rng),
               vc = draw(B, lk, D, rng);

    // The fp64 twin: out, LSE, and the probe over the image queries and image keys.
    std::vector<double> want_out(static_cast<std::size_t>(B) * queries * D), want_lse(static_cast<std::size_t>(B) * H * queries),
        want_probe(static_cast<std::size_t>(B) * nk, 0.0);
    auto row = [&](const host_segment& img, const host_segment& ctx, int img_rows, int ctx_rows, int b, int i, int h) {
        return i < img_rows ? &img.exact[(static_cast<std::size_t>(b) * img_rows + i) * D + static_cast<std::size_t>(h) * hd]
                            : &ctx.exact[(static_cast<std::size_t>(b) * ctx_rows + (i - img_rows)) * D + static_cast<std::size_t>(h) * hd];
    };
    std::vector<double> logits(static_cast<std::size_t>(keys));
    for (int b = 0; b < B; ++b)
        for (int h = 0; h < H; ++h)
            for (int i = 0; i < queries; ++i) {
                const double* q = row(qi, qc, nq, lq, b, i, h);
                double top = -INFINITY;
                for (int j = 0; j < keys; ++j) {
                    const double* k = row(ki, kc, nk, lk, b, j, h);
                    double dot = 0;
                    for (int d = 0; d < hd; ++d) dot += q[d] * k[d];
                    logits[static_cast<std::size_t>(j)] = dot * static_cast<double>(scale);
                    top = std::max(top, logits[static_cast<std::size_t>(j)]);
                }
                double sum = 0;
                for (int j = 0; j < keys; ++j) sum += std::exp(logits[static_cast<std::size_t>(j)] - top);
                const double lse = top + std::log(sum);
                want_lse[(static_cast<std::size_t>(b) * H + h) * queries + i] = lse;
                double* o = &want_out[(static_cast<std::size_t>(b) * queries + i) * D + static_cast<std::size_t>(h) * hd];
                for (int j = 0; j < keys; ++j) {
                    const double p = std::exp(logits[static_cast<std::size_t>(j)] - lse);
                    const double* v = row(vi, vc, nk, lk, b, j, h);
                    for (int d = 0; d < hd; ++d) o[d] += p * v[d];
                    if (i < nq && j < nk) want_probe[static_cast<std::size_t>(b) * nk + j] += p / H;
                }
            }

    // Device inputs and outputs ([batch][rows][hidden], heads contiguous, as the engine's buffers).
    const auto dqi = to_device(qi.values), dqc = to_device(qc.values), dki = to_device(ki.values), dkc = to_device(kc.values), dvi = to_device(vi.values),
               dvc = to_device(vc.values);
    auto make_args = [&](device_array<bf16>& out_img, device_array<bf16>& out_ctx, device_array<float>& lse) {
        attention_args<bf16> a;
        a.heads = H;
        a.hidden = D;
        a.scale = scale;
        a.q[0] = {dqi.get(), nq, static_cast<long long>(nq) * D};
        a.q[1] = {dqc.get(), lq, static_cast<long long>(lq) * D};
        a.k[0] = {dki.get(), nk, static_cast<long long>(nk) * D};
        a.k[1] = {dkc.get(), lk, static_cast<long long>(lk) * D};
        a.v[0] = {dvi.get(), nk, static_cast<long long>(nk) * D};
        a.v[1] = {dvc.get(), lk, static_cast<long long>(lk) * D};
        a.out[0] = out_img.get();
        a.out[1] = out_ctx.get();
        a.lse = lse.get();
        return a;
    };
    device_array<bf16> ref_img(static_cast<std::size_t>(B) * nq * D), ref_ctx(std::max<std::size_t>(1, static_cast<std::size_t>(B) * lq * D)),
        new_img(ref_img.n), new_ctx(ref_ctx.n);
    device_array<float> ref_lse(want_lse.size()), new_lse(want_lse.size());
    const auto ref_args = make_args(ref_img, ref_ctx, ref_lse), new_args = make_args(new_img, new_ctx, new_lse);

    launch_attention(ref_args, B, hd, nullptr);
    SPECDIFF_CUDA_CHECK_LAUNCH("reference attention");
    SPECDIFF_CUDA_CHECK(fa2::prepare(hd));
    const int splits = std::min(c.splits, (keys + fa2::block_keys - 1) / fa2::block_keys);
    device_array<float> partial_out(static_cast<std::size_t>(splits) * B * H * queries * hd), partial_lse(static_cast<std::size_t>(splits) * B * H * queries);
    const fa2::split_args sp{.splits = splits, .batch = B, .partial_out = partial_out.get(), .partial_lse = partial_lse.get()};
    if (hd == 64) fa2::launch<64>(new_args, B, sp, nullptr);
    else fa2::launch<128>(new_args, B, sp, nullptr);
    SPECDIFF_CUDA_CHECK_LAUNCH("attention_fa2_kernel");

    // The probe: the library's exact column sums and the fa2 tensor-core sweep, from each kernel's own LSE.
    device_array<float> lib_probe(want_probe.size()), new_probe(want_probe.size()), partial(static_cast<std::size_t>(B) * H * nk);
    {
        using key = specdiff::bfloat16;
        const specdiff::gpu::device_lse_attention<key> layer{
            {reinterpret_cast<const key*>(dqi.get()), B, H, nq, hd, D, hd, static_cast<std::ptrdiff_t>(nq) * D},
            {reinterpret_cast<const key*>(dki.get()), B, H, nk, hd, D, hd, static_cast<std::ptrdiff_t>(nk) * D},
            {ref_lse.get(), 1, queries, static_cast<std::ptrdiff_t>(H) * queries},
            scale};
        std::size_t bytes = 0;
        const specdiff::gpu::device_span<float> out{lib_probe.get(), static_cast<specdiff::index_t>(B) * nk};
        specdiff::gpu::lse_column_sums(nullptr, bytes, layer, out, specdiff::column_mode::overwrite, nullptr);
        device_array<unsigned char> ws(bytes);
        specdiff::gpu::lse_column_sums(ws.get(), bytes, layer, out, specdiff::column_mode::overwrite, nullptr);
    }
    const fa2::probe_args pa{.q = dqi.get(), .k = dki.get(), .lse = new_lse.get(), .partial = partial.get(), .n = nq, .keys = nk, .heads = H, .hidden = D,
                             .lse_queries = queries, .q_sample_stride = static_cast<long long>(nq) * D, .k_sample_stride = static_cast<long long>(nk) * D,
                             .scale = scale};
    if (hd == 64) fa2::launch_probe<64>(pa, B, false, new_probe.get(), nullptr);
    else fa2::launch_probe<128>(pa, B, false, new_probe.get(), nullptr);
    SPECDIFF_CUDA_CHECK_LAUNCH("fa2_probe_kernel");
    SPECDIFF_CUDA_CHECK(cudaDeviceSynchronize());

    // Compare.
    auto out_error = [&](const device_array<bf16>& img, const device_array<bf16>& ctx) {
        const auto gi = download_bf16(img), gc = download_bf16(ctx);
        double worst = 0, top = 0;
        for (int b = 0; b < B; ++b)
            for (int i = 0; i < queries; ++i)
                for (int e = 0; e < D; ++e) {
                    const double want = want_out[(static_cast<std::size_t>(b) * queries + i) * D + static_cast<std::size_t>(e)];
                    const double got = i < nq ? gi[(static_cast<std::size_t>(b) * nq + i) * D + static_cast<std::size_t>(e)]
                                              : gc[(static_cast<std::size_t>(b) * lq + (i - nq)) * D + static_cast<std::size_t>(e)];
                    worst = std::max(worst, std::abs(got - want));
                    top = std::max(top, std::abs(want));
                }
        return worst / std::max(top, 1e-30);
    };
    auto lse_error = [&](const device_array<float>& lse) {
        const auto g = download(lse);
        double worst = 0;
        for (std::size_t i = 0; i < g.size(); ++i) worst = std::max(worst, std::abs(static_cast<double>(g[i]) - want_lse[i]));
        return worst;
    };
    auto probe_error = [&](const device_array<float>& probe) {
        const auto g = download(probe);
        double diff = 0, norm = 0;
        for (std::size_t i = 0; i < g.size(); ++i) {
            diff += (g[i] - want_probe[i]) * (g[i] - want_probe[i]);
            norm += want_probe[i] * want_probe[i];
        }
        return std::sqrt(diff / std::max(norm, 1e-300));
    };
    attention_errors r;
    r.fa2_out = out_error(new_img, new_ctx);
    r.reference_out = out_error(ref_img, ref_ctx);
    r.fa2_lse = lse_error(new_lse);
    r.reference_lse = lse_error(ref_lse);
    r.fa2_probe = probe_error(new_probe);
    r.library_probe = probe_error(lib_probe);
    r.splits_used = splits;
    return r;
}

}  // namespace sd3::gpu::detail
