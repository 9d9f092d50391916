#include "sd3/workers.hpp"

#include <algorithm>
#include <chrono>
#include <stdexcept>
#include <string>

#if defined(__linux__)
#include <sched.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace sd3 {

namespace {

// How long an idle worker polls before it sleeps in the kernel. Long enough to catch the next loop of a
// forward pass on an idle machine without a wake-up (the serial work between two loops takes a few
// microseconds), short enough that a busy machine's other processes get the core back almost at once.
constexpr std::chrono::microseconds spin_before_sleep{20};

void cpu_relax() noexcept {
#if defined(__x86_64__) || defined(__i386__)
    _mm_pause();
#else
    std::this_thread::yield();
#endif
}

// Waits until `value` differs from `old` and returns the new value: polls for spin_before_sleep, then sleeps.
template <class T>
T wait_for_change(const std::atomic<T>& value, T old) noexcept {
    const auto start = std::chrono::steady_clock::now();
    for (int i = 1;; ++i) {
        const T now = value.load(std::memory_order_acquire);
        if (now != old) return now;
        if (i % 64 == 0 && std::chrono::steady_clock::now() - start > spin_before_sleep) break;
        cpu_relax();
    }
    for (;;) {
        value.wait(old, std::memory_order_acquire);
        const T now = value.load(std::memory_order_acquire);
        if (now != old) return now;
    }
}

// The team whose task the current thread is running, if any: a run from inside a task runs serially.
thread_local const workers* running_team = nullptr;
thread_local int running_worker = 0;

struct running_as {
    const workers* saved_team;
    int saved_worker;
    running_as(const workers* team, int worker) noexcept : saved_team(running_team), saved_worker(running_worker) {
        running_team = team;
        running_worker = worker;
    }
    ~running_as() {
        running_team = saved_team;
        running_worker = saved_worker;
    }
    running_as(const running_as&) = delete;
    running_as& operator=(const running_as&) = delete;
};

}  // namespace

int usable_cores() noexcept {
#if defined(__linux__)
    cpu_set_t set;
    CPU_ZERO(&set);
    if (sched_getaffinity(0, sizeof(set), &set) == 0) {
        const int n = CPU_COUNT(&set);
        if (n > 0) return n;
    }
#endif
    const unsigned n = std::thread::hardware_concurrency();
    return n > 0 ? static_cast<int>(n) : 1;
}

// round_: generation (24 bits) | tasks in the round (20 bits) | next task to claim (20 bits).
constexpr int task_bits = 20;
constexpr std::uint64_t task_mask = (std::uint64_t{1} << task_bits) - 1;
constexpr int max_round_tasks = static_cast<int>(task_mask);

constexpr std::uint64_t pack_round(std::uint64_t generation, std::uint64_t tasks, std::uint64_t next) noexcept {
    return (generation << (2 * task_bits)) | (tasks << task_bits) | next;
}
constexpr std::uint64_t next_generation(std::uint64_t r) noexcept { return ((r >> (2 * task_bits)) + 1) & 0xFFFFFF; }
constexpr int round_tasks(std::uint64_t r) noexcept { return static_cast<int>((r >> task_bits) & task_mask); }
constexpr int round_next(std::uint64_t r) noexcept { return static_cast<int>(r & task_mask); }

workers::workers(int threads) {
    if (threads < 1) throw std::invalid_argument("workers: threads = " + std::to_string(threads) + " must be at least 1");
    helpers_.reserve(static_cast<std::size_t>(threads - 1));
    try {
        for (int w = 1; w < threads; ++w) helpers_.emplace_back([this, w] { helper_loop(w); });
    } catch (...) {
        stop();  // join the helpers already started, then report
        throw;
    }
}

workers::~workers() { stop(); }

void workers::stop() noexcept {
    if (helpers_.empty()) return;
    stopping_.store(true, std::memory_order_relaxed);
    const std::uint64_t r = round_.load(std::memory_order_relaxed);
    round_.store(pack_round(next_generation(r), 0, 0), std::memory_order_release);
    round_.notify_all();
    for (auto& t : helpers_) t.join();
    helpers_.clear();
}

void workers::claim_tasks(int worker) noexcept {
    const running_as mark(this, worker);
    std::uint64_t r = round_.load(std::memory_order_acquire);
    for (;;) {
        const int next = round_next(r);
        if (next >= round_tasks(r)) return;
        if (!round_.compare_exchange_weak(r, r + 1, std::memory_order_acq_rel, std::memory_order_acquire)) continue;
        if (!failed_.load(std::memory_order_relaxed)) {
            try {
                fn_(context_, first_ + next, worker);
            } catch (...) {
                const std::lock_guard lock(error_mutex_);
                if (!error_) error_ = std::current_exception();
                failed_.store(true, std::memory_order_relaxed);
            }
        }
        if (finished_.fetch_add(1, std::memory_order_acq_rel) + 1 == round_tasks(r)) finished_.notify_one();
        r = round_.load(std::memory_order_acquire);
    }
}

void workers::helper_loop(int worker) noexcept {
    for (;;) {
        // Load before claiming: a round published while this worker claims is then seen as a change.
        const std::uint64_t seen = round_.load(std::memory_order_acquire);
        if (stopping_.load(std::memory_order_relaxed)) return;
        claim_tasks(worker);
        wait_for_change(round_, seen);
    }
}

void workers::run_round(int first, int count) {
    first_ = first;
    finished_.store(0, std::memory_order_relaxed);
    const std::uint64_t r = round_.load(std::memory_order_relaxed);
    round_.store(pack_round(next_generation(r), static_cast<std::uint64_t>(count), 0),
                 std::memory_order_release);  // publishes fn_, context_, first_ with the round
    round_.notify_all();
    claim_tasks(0);
    for (int done = finished_.load(std::memory_order_acquire); done != count; done = finished_.load(std::memory_order_acquire))
        wait_for_change(finished_, done);
}

void workers::run_erased(int tasks, task_fn fn, void* context) {
    if (tasks <= 0) return;
    if (helpers_.empty() || tasks == 1 || running_team != nullptr) {
        for (int task = 0; task < tasks; ++task) fn(context, task, running_team ? running_worker : 0);
        return;
    }
    fn_ = fn;
    context_ = context;
    failed_.store(false, std::memory_order_relaxed);
    error_ = nullptr;
    for (int first = 0; first < tasks && !failed_.load(std::memory_order_relaxed); first += max_round_tasks)
        run_round(first, std::min(max_round_tasks, tasks - first));
    if (error_) {
        std::exception_ptr error = std::move(error_);
        error_ = nullptr;
        std::rethrow_exception(error);
    }
}

}  // namespace sd3
