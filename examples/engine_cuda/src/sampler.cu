// The device sampler: sd3::sample_cfg's loop (CFG combine, Euler step) on device rows, and SpecDiff's two passes
// as methods::run_specdiff runs them on the CPU (examples/methods/src/token_level.cpp), with the device accelerator
// in place of the host one. Every call in run() only enqueues, so a run captures into one CUDA graph.
#include "sd3/cuda/sampler.hpp"

#include <cmath>
#include <stdexcept>
#include <string>

#include <specdiff/cuda/specdiff.cuh>
#include <specdiff/specdiff.hpp>

#include "device_array.hpp"
#include "sd3/errors.hpp"

namespace sd3::gpu {
namespace {

template <class... Parts>
[[noreturn]] void fail(const Parts&... parts) {
    throw std::invalid_argument(message("sd3::gpu::sampler: ", parts...));
}

// v = v_u + guidance (v_c - v_u) with CFG (the halves `half` floats apart), then latents += dt v: sample_cfg's
// formulas, element by element.
__global__ void guided_euler_kernel(float* latents, const float* velocity, std::size_t half, bool cfg, float guidance, float dt) {
    for (std::size_t e = blockIdx.x * std::size_t{blockDim.x} + threadIdx.x; e < half; e += std::size_t{gridDim.x} * blockDim.x) {
        float v = velocity[e];
        if (cfg) v = v + guidance * (velocity[half + e] - v);
        latents[e] = latents[e] + dt * v;
    }
}

using detail::device_array;
using detail::upload;

using accelerator = specdiff::gpu::accelerator<specdiff::specdiff_scorer, specdiff::gpu::self_speculation, specdiff::gpu::three_level_classifier<>,
                                               specdiff::step_schedule, specdiff::specdiff_weighted, specdiff::gpu::device_cache_store<float>>;

}  // namespace

struct sampler::impl {
    const transformer* net;
    flow_match_euler main;
    std::optional<flow_match_euler> speculative;
    cudaStream_t stream;
    int images = 0, batch = 0, tokens = 0, features = 0;
    bool cfg = false;
    float guidance = 1.f;
    int probe_query_step = 1;
    forward_inputs model_in;
    device_array<float> noise, latents, spec_latents, context, pooled, velocity, compact, probe;
    device_array<std::int32_t> records;  // [step][model sample][token]
    std::optional<workspace> ws;  // made after the arguments are checked (as every allocation)
    std::optional<kv_cache> kv;
    device_array<unsigned char> acc_memory;
    std::unique_ptr<accelerator> acc;
    std::vector<int> counts;  // host-known C1 count of each main step (last run)
    cudaGraphExec_t graph = nullptr;
    bool profiling = false, capturing = false;
    std::vector<cudaEvent_t> events;  // [step][4]: before plan_step, after it, after the forward, after complete_step

    impl(const transformer& n, const flow_match_euler& schedule, cudaStream_t s) : net(&n), main(schedule), stream(s) {}
    impl(const impl&) = delete;
    impl& operator=(const impl&) = delete;
    ~impl() {
        if (graph) cudaGraphExecDestroy(graph);
        for (cudaEvent_t e : events) cudaEventDestroy(e);
    }

    void mark(int step, int point) {
        if (profiling && !capturing) SPECDIFF_CUDA_CHECK(cudaEventRecord(events[static_cast<std::size_t>(step) * 4 + point], stream));
    }

    void euler(float* state, const flow_match_euler& s, int i) {
        const std::size_t half = static_cast<std::size_t>(images) * tokens * features;
        const float dt = s.sigmas()[static_cast<std::size_t>(i) + 1] - s.sigmas()[static_cast<std::size_t>(i)];
        guided_euler_kernel<<<specdiff::gpu::detail::blocks_for(half, 256), 256, 0, stream>>>(state, velocity.get(), half, cfg, guidance, dt);
        SPECDIFF_CUDA_CHECK_LAUNCH("guided_euler_kernel");
    }

    void run() {
        const std::size_t state = static_cast<std::size_t>(images) * tokens * features;
        SPECDIFF_CUDA_CHECK(cudaMemcpyAsync(latents.get(), noise.get(), state * sizeof(float), cudaMemcpyDeviceToDevice, stream));
        forward_inputs in = model_in;
        const specdiff::gpu::device_matrix<float> rows(velocity.get(), batch * tokens, features);
        const specdiff::gpu::device_span<const float> attention(probe.get(), batch * tokens);
        if (!acc) {  // full compute
            in.latent_rows = latents.get();
            for (int k = 0; k < main.steps(); ++k) {
                in.timestep = main.timesteps()[static_cast<std::size_t>(k)];
                net->forward(in, velocity.get(), *ws, stream);
                euler(latents.get(), main, k);
                counts[static_cast<std::size_t>(k)] = tokens;
            }
            return;
        }
        acc->reset();
        // 1. The speculative pass: the same noise and conditioning, every token, its attention recorded.
        SPECDIFF_CUDA_CHECK(cudaMemcpyAsync(spec_latents.get(), noise.get(), state * sizeof(float), cudaMemcpyDeviceToDevice, stream));
        acc->begin_speculation(std::span<const float>(speculative->timesteps()));
        in.latent_rows = spec_latents.get();
        for (int s = 0; s < speculative->steps(); ++s) {
            in.timestep = speculative->timesteps()[static_cast<std::size_t>(s)];
            net->forward(in, velocity.get(), {.attention_probe = probe.get(), .probe_query_step = probe_query_step}, *ws, stream);
            acc->record_speculation(s, attention);
            euler(spec_latents.get(), *speculative, s);
        }
        // 2. The main pass: C1 through the network against the K/V cache, C2 / C3 from the accelerator's store.
        in.latent_rows = latents.get();
        for (int k = 0; k < main.steps(); ++k) {
            in.timestep = main.timesteps()[static_cast<std::size_t>(k)];
            mark(k, 0);
            auto step = acc->plan_step(k, in.timestep);
            mark(k, 1);
            const int c = step.compute_count();
            counts[static_cast<std::size_t>(k)] = c;
            forward_options options{.kv = &*kv, .attention_probe = probe.get(), .probe_query_step = probe_query_step};
            if (c == 0) {  // nothing computed: every row from the cache; the scorer keeps the last attention
                mark(k, 2);
                acc->complete_step(std::move(step), specdiff::gpu::device_matrix<const float>(compact.get(), 0, features), rows, attention);
            } else if (c == tokens) {  // dense: the plain forward (CR 0 is full RFlow exactly)
                net->forward(in, velocity.get(), options, *ws, stream);
                mark(k, 2);
                acc->complete_step(std::move(step), rows, attention);
            } else {
                options.image_tokens = step.compute_tokens().data;  // the accelerator's memory, valid until the next plan_step
                options.tokens_per_sample = c;
                net->forward(in, compact.get(), options, *ws, stream);
                mark(k, 2);
                acc->complete_step(std::move(step), specdiff::gpu::device_matrix<const float>(compact.get(), batch * c, features), rows, attention);
            }
            mark(k, 3);
            if (options.image_tokens)  // the C1 lists, for compute_tokens() (outside the timed parts)
                SPECDIFF_CUDA_CHECK(cudaMemcpyAsync(records.get() + static_cast<std::size_t>(k) * batch * tokens, options.image_tokens,
                                                    static_cast<std::size_t>(batch) * c * sizeof(std::int32_t), cudaMemcpyDeviceToDevice, stream));
            euler(latents.get(), main, k);
        }
    }
};

sampler::sampler(const transformer& net, const flow_match_euler& schedule, const sampling_inputs& in, std::optional<specdiff_settings> settings,
                 cudaStream_t stream)
    : impl_(std::make_unique<impl>(net, schedule, stream)) {
    impl& s = *impl_;
    const auto& c = net.config();
    if (net.patch_inputs() != net.patch_features())
        fail("the model's in_channels (", c.in_channels, ") and out_channels (", c.out_channels, ") differ: the velocity cannot step the latents");
    if (in.batch < 1) fail("batch = ", in.batch, " must be >= 1");
    if (!std::isfinite(in.guidance)) fail("guidance = ", in.guidance, " is not finite");
    s.cfg = in.guidance > 1.f;
    s.guidance = in.guidance;
    s.images = in.batch;
    s.batch = s.cfg ? 2 * in.batch : in.batch;
    if (s.batch > net.limits().max_batch)
        fail("model batch ", s.batch, s.cfg ? " (2 x batch for guidance)" : "", " exceeds the transformer's max_batch ", net.limits().max_batch);
    if (in.grid_height < 1 || in.grid_width < 1) fail("grid_height x grid_width = ", in.grid_height, " x ", in.grid_width, " must be positive");
    s.tokens = in.grid_height * in.grid_width;  // the transformer bounds both by its position table
    s.features = net.patch_features();
    auto expect = [](const char* what, std::span<const float> v, std::size_t want) {
        if (v.size() != want) fail(what, ": ", v.size(), " floats, expected ", want);
        for (std::size_t i = 0; i < v.size(); ++i)
            if (!std::isfinite(v[i])) fail(what, "[", i, "] = ", v[i], " is not finite");
    };
    const std::size_t B = static_cast<std::size_t>(in.batch), L = static_cast<std::size_t>(in.context_tokens);
    expect("noise_rows", in.noise_rows, B * s.tokens * s.features);
    expect("context", in.context, B * L * c.joint_attention_dim);
    expect("pooled", in.pooled, B * c.pooled_projection_dim);
    if (s.cfg) {
        expect("negative_context", in.negative_context, B * L * c.joint_attention_dim);
        expect("negative_pooled", in.negative_pooled, B * c.pooled_projection_dim);
    }
    if (settings) {
        // >= 1: the speculative pass is what ranks the tokens (step_schedule::validate, below, checks the rest)
        if (settings->speculative_steps < 1) fail("speculative_steps = ", settings->speculative_steps, " must be >= 1");
        if (settings->probe_query_step < 1) fail("probe_query_step = ", settings->probe_query_step, " must be >= 1");
        s.probe_query_step = settings->probe_query_step;
    }
    const int steps = schedule.steps();
    // Host-side checks of the accelerator's setup come before any allocation.
    std::vector<specdiff::index_t> resets;
    std::optional<specdiff::accelerator_config> config;
    std::optional<specdiff::step_schedule> step_schedule;
    if (settings) {
        for (int r : settings->reset_steps)
            if (r < steps) resets.push_back(r);
        step_schedule = specdiff::step_schedule{settings->warmup_steps, settings->refresh_interval, settings->speculative_steps, resets};
        step_schedule->validate(steps);
        config = specdiff::accelerator_config{.tokens = s.tokens, .batch = s.batch, .steps = steps, .feature_dim = s.features,
                                              .share_cfg_plan = settings->share_cfg_plan && s.cfg};
        config->validate();
        specdiff::detail::expect_cache_rate(settings->cache_rate);
        specdiff::detail::expect_reuse_mass(settings->reuse_mass);
        s.speculative = flow_match_euler::at_timesteps(
            specdiff::aligned_speculative_timesteps(std::span<const float>(schedule.timesteps()), settings->speculative_steps, *step_schedule));
    }

    // Device memory, once.
    std::vector<float> context(static_cast<std::size_t>(s.batch) * L * c.joint_attention_dim), pooled(static_cast<std::size_t>(s.batch) * c.pooled_projection_dim);
    auto place = [](std::span<const float> from, std::vector<float>& to, std::size_t at) { std::copy(from.begin(), from.end(), to.begin() + at); };
    if (s.cfg) {  // [uncond; cond]
        place(in.negative_context, context, 0);
        place(in.context, context, in.context.size());
        place(in.negative_pooled, pooled, 0);
        place(in.pooled, pooled, in.pooled.size());
    } else {
        place(in.context, context, 0);
        place(in.pooled, pooled, 0);
    }
    s.ws.emplace(net);
    s.noise = upload(in.noise_rows);
    s.context = upload(std::span<const float>(context));
    s.pooled = upload(std::span<const float>(pooled));
    const std::size_t state = B * s.tokens * s.features, rows = static_cast<std::size_t>(s.batch) * s.tokens * s.features;
    s.latents = device_array<float>(state);
    s.velocity = device_array<float>(rows);
    s.model_in = {.batch = s.batch, .grid_height = in.grid_height, .grid_width = in.grid_width, .context_tokens = in.context_tokens,
                  .latent_rows = nullptr, .latent_batch = in.batch, .timestep = 0.f, .context = s.context.get(), .pooled = s.pooled.get()};
    s.counts.assign(static_cast<std::size_t>(steps), 0);
    if (settings) {
        s.spec_latents = device_array<float>(state);
        s.compact = device_array<float>(rows);
        s.probe = device_array<float>(static_cast<std::size_t>(s.batch) * s.tokens);
        s.records = device_array<std::int32_t>(static_cast<std::size_t>(steps) * s.batch * s.tokens);
        s.kv.emplace(net, s.batch, s.tokens);
        const specdiff::gpu::three_level_classifier<> classifier(s.tokens, config->plans(), settings->cache_rate, settings->reuse_mass);
        const std::size_t bytes = accelerator::memory_bytes(*config, classifier, *step_schedule);
        s.acc_memory = device_array<unsigned char>(bytes);
        s.acc = std::make_unique<accelerator>(*config, specdiff::specdiff_scorer{}, specdiff::gpu::self_speculation{}, classifier, *step_schedule,
                                              s.acc_memory.get(), bytes, stream);
    }
}

sampler::~sampler() = default;

void sampler::run() { impl_->run(); }

void sampler::capture() {
    impl& s = *impl_;
    // Every way out of a failed capture clears the runtime's last error (cudaGetLastError) before throwing: the
    // error has been reported here, and left behind it would be read by the next launch check (the next run()'s
    // first kernel) as that kernel's failure.
    auto failed = [](cudaError_t code, const char* call, int line) {
        (void)cudaGetLastError();
        throw specdiff::gpu::cuda_error(code, call, __FILE__, line);
    };
    if (const cudaError_t began = cudaStreamBeginCapture(s.stream, cudaStreamCaptureModeGlobal); began != cudaSuccess)
        failed(began, "cudaStreamBeginCapture (a capture needs a stream of its own, not the legacy default stream)", __LINE__);
    cudaGraph_t graph = nullptr;
    s.capturing = true;
    try {
        s.run();
        s.capturing = false;
    } catch (...) {
        s.capturing = false;
        cudaStreamEndCapture(s.stream, &graph);  // ends the (invalidated) capture; the error is the one to report
        if (graph) cudaGraphDestroy(graph);
        (void)cudaGetLastError();
        throw;
    }
    if (const cudaError_t ended = cudaStreamEndCapture(s.stream, &graph); ended != cudaSuccess) {
        if (graph) cudaGraphDestroy(graph);
        failed(ended, "cudaStreamEndCapture", __LINE__);
    }
    cudaGraphExec_t exec = nullptr;
    const cudaError_t made = cudaGraphInstantiate(&exec, graph, 0);
    cudaGraphDestroy(graph);
    if (made != cudaSuccess) failed(made, "cudaGraphInstantiate", __LINE__);
    if (s.graph) cudaGraphExecDestroy(s.graph);
    s.graph = exec;
}

void sampler::replay() {
    if (!impl_->graph) throw std::logic_error("sd3::gpu::sampler::replay: nothing captured (call capture() first)");
    SPECDIFF_CUDA_CHECK(cudaGraphLaunch(impl_->graph, impl_->stream));
}

void sampler::set_profiling(bool on) {
    impl& s = *impl_;
    if (on && s.events.empty()) {
        s.events.resize(static_cast<std::size_t>(s.main.steps()) * 4);
        for (auto& e : s.events) SPECDIFF_CUDA_CHECK(cudaEventCreate(&e));
    }
    s.profiling = on;
}

std::vector<sampler::step_time> sampler::step_times() const {
    const impl& s = *impl_;
    if (!s.profiling || !s.acc) throw std::logic_error("sd3::gpu::sampler::step_times: profiling is off or the sampler runs no accelerator");
    SPECDIFF_CUDA_CHECK(cudaStreamSynchronize(s.stream));
    std::vector<step_time> times;
    for (int k = 0; k < s.main.steps(); ++k) {
        const cudaEvent_t* e = &s.events[static_cast<std::size_t>(k) * 4];
        float plan = 0, forward = 0, complete = 0;
        SPECDIFF_CUDA_CHECK(cudaEventElapsedTime(&plan, e[0], e[1]));
        SPECDIFF_CUDA_CHECK(cudaEventElapsedTime(&forward, e[1], e[2]));
        SPECDIFF_CUDA_CHECK(cudaEventElapsedTime(&complete, e[2], e[3]));
        const int c = s.counts[static_cast<std::size_t>(k)];
        times.push_back({.dense = c == s.tokens, .computed = c, .library_ms = plan + complete, .forward_ms = forward});
    }
    return times;
}

int sampler::model_batch() const noexcept { return impl_->batch; }
int sampler::steps() const noexcept { return impl_->main.steps(); }
int sampler::speculative_steps() const noexcept { return impl_->speculative ? impl_->speculative->steps() : 0; }

int sampler::compute_count(int step) const {
    if (step < 0 || step >= steps()) throw std::out_of_range(message("sd3::gpu::sampler::compute_count: step = ", step, " outside [0, ", steps(), ")"));
    return impl_->counts[static_cast<std::size_t>(step)];
}

std::vector<std::int32_t> sampler::compute_tokens(int step) const {
    const impl& s = *impl_;
    const int c = compute_count(step);
    std::vector<std::int32_t> ids(static_cast<std::size_t>(s.batch) * c);
    if (c == s.tokens || !s.acc) {  // dense: every token
        for (std::size_t i = 0; i < ids.size(); ++i) ids[i] = static_cast<std::int32_t>(i % static_cast<std::size_t>(s.tokens));
        return ids;
    }
    SPECDIFF_CUDA_CHECK(cudaMemcpyAsync(ids.data(), s.records.get() + static_cast<std::size_t>(step) * s.batch * s.tokens, ids.size() * sizeof(std::int32_t),
                                        cudaMemcpyDeviceToHost, s.stream));
    SPECDIFF_CUDA_CHECK(cudaStreamSynchronize(s.stream));
    return ids;
}

std::vector<float> sampler::latent_rows() const {
    const impl& s = *impl_;
    std::vector<float> rows(s.latents.n);
    SPECDIFF_CUDA_CHECK(cudaMemcpyAsync(rows.data(), s.latents.get(), s.latents.bytes(), cudaMemcpyDeviceToHost, s.stream));
    SPECDIFF_CUDA_CHECK(cudaStreamSynchronize(s.stream));
    return rows;
}

void sampler::check_status() const {
    const impl& s = *impl_;
    if (const unsigned t = s.ws->read_status(s.stream))
        throw std::runtime_error(message("sd3::gpu::sampler: the workspace's status word is ", t, " (a C1 token list out of order or range)"));
    if (s.acc) s.acc->check_status();
}

std::size_t sampler::kv_cache_bytes() const noexcept { return impl_->kv ? impl_->kv->bytes() : 0; }
std::size_t sampler::accelerator_bytes() const noexcept { return impl_->acc_memory.bytes(); }
std::size_t sampler::buffer_bytes() const noexcept {
    const impl& s = *impl_;
    return s.ws->bytes() + s.noise.bytes() + s.latents.bytes() + s.spec_latents.bytes() + s.context.bytes() + s.pooled.bytes() + s.velocity.bytes() + s.compact.bytes() +
           s.probe.bytes() + s.records.bytes();
}

}  // namespace sd3::gpu
