// SpecDiff: self-speculative, multi-level token caching for diffusion transformers (host models).
// The CUDA models of the same contracts live in <specdiff/cuda/specdiff.cuh>.
#pragma once

#include "accelerator.hpp"
#include "approximators.hpp"
#include "attention.hpp"
#include "cache_store.hpp"
#include "classifiers.hpp"
#include "common.hpp"
#include "learned.hpp"
#include "concepts.hpp"
#include "math.hpp"
#include "predictors.hpp"
#include "schedules.hpp"
#include "scorers.hpp"
#include "step_cache.hpp"
#include "storage.hpp"
#include "token_plan.hpp"

namespace specdiff {
inline constexpr int version_major = 0;
inline constexpr int version_minor = 2;
}  // namespace specdiff
