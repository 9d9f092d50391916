// Reading diffusers weights by name (shape checked against the config, every value finite) and drawing random
// ones, shared by the SD3 and FLUX models.
#pragma once

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "sd3/errors.hpp"
#include "sd3/model.hpp"
#include "sd3/safetensors.hpp"

namespace sd3::detail {

inline std::string shape_text(const std::vector<std::int64_t>& s) {
    std::string t = "[";
    for (std::size_t i = 0; i < s.size(); ++i) t += (i ? ", " : "") + std::to_string(s[i]);
    return t + "]";
}

// Reads `name`, checking that its shape is `want` exactly and that every value is finite.
inline std::vector<float> read_tensor(const safetensors_file& f, const std::string& name, const std::vector<std::int64_t>& want) {
    auto fail = [&](const auto&... what) {
        throw std::runtime_error(message("safetensors file '", path_excerpt(f.path().string()), "'", what...));
    };
    if (!f.contains(name)) fail(": missing tensor '", name, "' (shape ", shape_text(want), ")");
    const auto& info = f.info(name);
    if (info.shape != want)
        fail(", tensor '", name, "': shape ", excerpt(shape_text(info.shape)), " does not match the config, which needs ",
             shape_text(want));
    return f.read_finite(name);
}

inline linear read_linear(const safetensors_file& f, const std::string& prefix, int in, int out) {
    linear l;
    l.in = in;
    l.out = out;
    l.weight = read_tensor(f, prefix + ".weight", {out, in});
    l.bias = read_tensor(f, prefix + ".bias", {out});
    return l;
}

// Stacks linears with the same input width along the output dimension (q | k | v).
inline linear stack(const std::vector<linear>& parts) {
    linear s;
    s.in = parts.front().in;
    for (const auto& p : parts) {
        s.out += p.out;
        s.weight.insert(s.weight.end(), p.weight.begin(), p.weight.end());
        s.bias.insert(s.bias.end(), p.bias.begin(), p.bias.end());
    }
    return s;
}

// q | k | v of an attention, fused into one D -> 3D linear (diffusers' names under `attn`).
inline linear read_fused_qkv(const safetensors_file& f, const std::string& attn, const char* q, const char* k, const char* v,
                             int D) {
    return stack({read_linear(f, attn + q, D, D), read_linear(f, attn + k, D, D), read_linear(f, attn + v, D, D)});
}

// Random weights for tests and benchmarks: linears N(0, scale^2 / fan_in), norm weights around 1.
struct random_weights {
    std::mt19937_64 rng;
    float scale;
    std::normal_distribution<float> normal{0.0f, 1.0f};

    random_weights(std::uint64_t seed, float scale_) : rng(seed), scale(scale_) {}
    void fill(std::vector<float>& v, std::size_t n, float sd, float mean = 0.0f) {
        v.resize(n);
        for (auto& x : v) x = mean + sd * normal(rng);
    }
    linear make(int in, int out) {
        linear l;
        l.in = in;
        l.out = out;
        const float sd = scale / std::sqrt(static_cast<float>(in));
        fill(l.weight, static_cast<std::size_t>(in) * out, sd);
        fill(l.bias, static_cast<std::size_t>(out), sd);
        return l;
    }
    std::vector<float> norm(int n) {
        std::vector<float> v;
        fill(v, static_cast<std::size_t>(n), 0.2f, 1.0f);
        return v;
    }
};

// A diffusers save_pretrained folder: config.json (read by `load_config`) and diffusion_pytorch_model.safetensors.
template <class Model, class LoadConfig>
Model load_folder(const std::filesystem::path& folder, LoadConfig load_config) {
    const auto config = load_config(folder / "config.json");
    const safetensors_file file(folder / "diffusion_pytorch_model.safetensors");
    return Model::from_safetensors(config, file);
}

// A joint (two-stream) block by diffusers' names under `prefix` ("transformer_blocks.3."): SD3's, with MMDiT-X's
// second attention when `dual_attention`, and FLUX's double-stream block (qk-norm, never context_pre_only).
// Defined in model.cpp.
block_weights read_joint_block(const safetensors_file& f, const std::string& prefix, int D, int head_dim, bool qk_norm,
                               bool context_pre_only, bool dual_attention);
block_weights random_joint_block(random_weights& r, int D, int head_dim, bool qk_norm, bool context_pre_only, bool dual_attention);
std::size_t parameter_count(const block_weights& b);

}  // namespace sd3::detail
