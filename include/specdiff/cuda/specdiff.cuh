// SpecDiff's CUDA models (device twins of the host contracts in <specdiff/specdiff.hpp>). Include from .cu
// files compiled by nvcc; every operation is stream-ordered, allocation-free and graph-capturable, with
// caller-supplied memory sized by a query.
#pragma once

#include "accelerator.cuh"
#include "attention.cuh"
#include "cache_store.cuh"
#include "classifier.cuh"
#include "error.cuh"
#include "gather.cuh"
#include "lse.cuh"
#include "plan.cuh"
#include "probe.cuh"
#include "rows.cuh"
#include "scorers.cuh"
#include "status.cuh"
#include "views.cuh"
