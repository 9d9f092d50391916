// The engine's threads: a fixed team that runs parallel loops, built to hold up when the machine is busy.
//
//     sd3::workers team(2);
//     team.run(tasks, [&](int task, int worker) { ... });   // returns when every task is done
//
// Why not OpenMP's team: libgomp's idle threads spin at barriers for a long while (GOMP_SPINCOUNT, read from
// the environment once at program start; a library cannot change it), so on a machine where another process
// holds one core, our spinning thread and the other process share that core and the thread that has work
// waits for it. Measured in docs/engine.md ("Threads under load"). Here an idle worker spins for a few
// microseconds only (enough to catch the next loop of a forward pass on an idle machine) and then sleeps
// in the kernel (a futex, through std::atomic::wait) until the next loop starts.
//
// Tasks are claimed one at a time from a shared counter, so a worker slowed by another process takes fewer
// of them; the caller is worker 0 and claims tasks too. Loops too small to pay for waking a worker run on
// the caller alone (`transformer::set_min_chunk_work`, `default_min_chunk_work`).
#pragma once

#include <atomic>
#include <cstdint>
#include <exception>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

namespace sd3 {

// The cores this process may run on (its CPU affinity mask; hardware_concurrency where that is unknown):
// the default thread count of the programs, so that a process pinned to one core does not start two threads.
int usable_cores() noexcept;

class workers {
public:
    // threads >= 1: the caller plus threads - 1 helper threads, started here and joined by the destructor.
    explicit workers(int threads);
    ~workers();
    workers(const workers&) = delete;
    workers& operator=(const workers&) = delete;

    int size() const noexcept { return static_cast<int>(helpers_.size()) + 1; }

    // Runs f(task, worker) for every task in [0, tasks), worker in [0, size()), and returns when all are done.
    // Tasks must write disjoint memory; results must not depend on which worker ran a task. If tasks throw,
    // the remaining tasks are skipped and the first exception is rethrown here. One run at a time per team; a
    // run from inside a task runs serially on the calling worker.
    template <class F>
    void run(int tasks, F&& f) {
        using fn = std::remove_reference_t<F>;
        run_erased(tasks, [](void* context, int task, int worker) { (*static_cast<fn*>(context))(task, worker); },
                   const_cast<void*>(static_cast<const void*>(&f)));
    }

private:
    using task_fn = void (*)(void* context, int task, int worker);
    void run_erased(int tasks, task_fn fn, void* context);
    void run_round(int first, int count);
    void claim_tasks(int worker) noexcept;
    void helper_loop(int worker) noexcept;
    void stop() noexcept;

    // The loop being run. `round_` packs (generation, tasks in this round, next task to claim) into one word, so
    // that a worker claims a task of the current round with one compare-and-swap and a worker that wakes late
    // can never claim a task of a round that is over; fn_/context_/first_ are written before a round is
    // published and read only by a worker that has claimed one of its tasks.
    std::atomic<std::uint64_t> round_{0};
    std::atomic<int> finished_{0};  // tasks of the current round run (or skipped after a failure)
    task_fn fn_ = nullptr;
    void* context_ = nullptr;
    int first_ = 0;
    std::atomic<bool> failed_{false};
    std::exception_ptr error_;
    std::mutex error_mutex_;
    std::atomic<bool> stopping_{false};
    std::vector<std::thread> helpers_;
};

}  // namespace sd3
