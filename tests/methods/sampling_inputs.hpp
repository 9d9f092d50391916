// The sampling problem the methods tests share: fresh noise and conditioning for a CFG batch of 2 samples
// (2 x 8 x 8 latents, 3 context tokens of 12, pooled rows of 10: the suites' small model configs).
#pragma once

#include <cstdint>
#include <random>
#include <vector>

#include "methods/run.hpp"

namespace methods_testing {

struct sampling_inputs {
  std::uint64_t seed;  // printed on failure by the tests (INFO)
  std::vector<float> noise, context, negative_context, pooled, negative_pooled;

  explicit sampling_inputs(std::uint64_t seed_) : seed(seed_) {
    std::mt19937_64 rng(seed + 1);
    std::normal_distribution<float> n(0.f, 1.f);
    auto fill = [&](std::vector<float>& v, std::size_t count) {
      v.resize(count);
      for (auto& x : v) x = n(rng);
    };
    fill(noise, 2 * 2 * 8 * 8);
    fill(context, 2 * 3 * 12);
    fill(negative_context, 2 * 3 * 12);
    fill(pooled, 2 * 10);
    fill(negative_pooled, 2 * 10);
  }

  /// 8 steps by default, CFG 3, shift 3, on `net`.
  methods::problem problem_on(sd3::transformer& net, int steps = 8) {
    methods::problem p;
    p.net = &net;
    p.inputs = {2, 8, 8, 3, noise, context, negative_context, pooled, negative_pooled};
    p.steps = steps;
    p.guidance = 3.f;
    p.shift = 3.0;
    return p;
  }
};

}  // namespace methods_testing
