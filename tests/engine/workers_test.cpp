// sd3::workers: every task runs once on a valid worker, errors reach the caller, nested loops run serially, and
// many short loops in a row lose no wake-up (a lost one would hang the test, which ctest's timeout reports).
#include <doctest/doctest.h>

#include <algorithm>
#include <atomic>
#include <numeric>
#include <random>
#include <stdexcept>
#include <vector>

#include "sd3/workers.hpp"
#include "test_util.hpp"

TEST_CASE("workers: every task runs exactly once, on a worker of the team") {
    const auto seed = test_util::fresh_seed();
    std::mt19937 rng(seed);
    for (int threads : {1, 2, 3, 5}) {
        sd3::workers team(threads);
        CHECK(team.size() == threads);
        for (int tasks : {0, 1, 2, 7, 64, 1000, static_cast<int>(std::uniform_int_distribution<int>(1, 5000)(rng))}) {
            CAPTURE(threads);
            CAPTURE(tasks);
            std::vector<int> runs(static_cast<std::size_t>(tasks), 0);
            std::vector<int> worker_of(static_cast<std::size_t>(tasks), -1);
            team.run(tasks, [&](int task, int worker) {
                ++runs[static_cast<std::size_t>(task)];
                worker_of[static_cast<std::size_t>(task)] = worker;
            });
            CHECK(std::count(runs.begin(), runs.end(), 1) == tasks);
            for (int w : worker_of) CHECK((w >= 0 && w < threads));
        }
    }
}

TEST_CASE("workers: a loop longer than one round (2^20 tasks) is run in rounds, each task once") {
    sd3::workers team(2);
    const int tasks = (1 << 20) + 12345;
    std::vector<unsigned char> runs(static_cast<std::size_t>(tasks), 0);
    team.run(tasks, [&](int task, int) { ++runs[static_cast<std::size_t>(task)]; });
    CHECK(std::count(runs.begin(), runs.end(), 1) == tasks);
}

TEST_CASE("workers: thousands of short loops in a row (no lost wake-up), sums against the closed form") {
    sd3::workers team(3);
    std::atomic<long long> sum{0};
    long long expected = 0;
    for (int loop = 0; loop < 20000; ++loop) {
        const int tasks = 1 + loop % 5;
        team.run(tasks, [&](int task, int) { sum.fetch_add(task + 1, std::memory_order_relaxed); });
        expected += static_cast<long long>(tasks) * (tasks + 1) / 2;
    }
    CHECK(sum.load() == expected);
}

TEST_CASE("workers: the first exception reaches the caller, the team stays usable") {
    sd3::workers team(2);
    std::atomic<int> ran{0};
    CHECK_THROWS_WITH_AS(team.run(100,
                                  [&](int task, int) {
                                      ran.fetch_add(1);
                                      if (task == 3) throw std::runtime_error("task 3 failed");
                                  }),
                         "task 3 failed", std::runtime_error);
    CHECK(ran.load() <= 100);
    std::atomic<int> after{0};
    team.run(50, [&](int, int) { after.fetch_add(1); });
    CHECK(after.load() == 50);
}

TEST_CASE("workers: a loop inside a task runs serially on that task's worker") {
    sd3::workers team(2);
    std::vector<int> inner_worker(8 * 4, -1), outer_worker(8, -1);
    team.run(8, [&](int task, int worker) {
        outer_worker[static_cast<std::size_t>(task)] = worker;
        team.run(4, [&](int inner, int w) { inner_worker[static_cast<std::size_t>(task * 4 + inner)] = w; });
    });
    for (int t = 0; t < 8; ++t)
        for (int i = 0; i < 4; ++i) CHECK(inner_worker[static_cast<std::size_t>(t * 4 + i)] == outer_worker[static_cast<std::size_t>(t)]);
}

TEST_CASE("workers: bad thread counts are refused, naming the value") {
    CHECK_THROWS_WITH_AS(sd3::workers(0), doctest::Contains("threads = 0"), std::invalid_argument);
    CHECK_THROWS_WITH_AS(sd3::workers(-3), doctest::Contains("threads = -3"), std::invalid_argument);
    CHECK(sd3::usable_cores() >= 1);
}
