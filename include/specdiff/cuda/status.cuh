// Device-side status words. Kernels cannot throw, so where the host models throw on bad data (an index out
// of range, a token with no cached feature, a non-finite value) the device models skip the offending row
// and raise a bit in a caller-visible 32-bit word. Reading the word synchronises with the stream, so it is
// for checkpoints and tests, never the per-step path.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "error.cuh"

namespace specdiff::gpu {

enum status_bit : std::uint32_t {
  status_nonfinite_score = 1u << 0,     ///< classify: a NaN or infinite score (NaN is ranked as -inf)
  status_nonfinite_feature = 1u << 1,   ///< cache store: a pushed row held NaN or infinity (stored anyway)
  status_empty_history = 1u << 2,       ///< cache store fill: a token with no cached row (output row left as is)
  status_rejected_tags = 1u << 3,       ///< cache store fill: the approximator refused the tags (repeated timestep)
  status_index_out_of_range = 1u << 4,  ///< a row index outside the matrix it addresses (row skipped)
  status_count_over_capacity = 1u << 5, ///< a plan level holds more rows than the caller's capacity (rest skipped)
  status_conversion_overflow = 1u << 6, ///< a finite float became infinite on conversion to a half or bfloat16 row
                                        ///< or store entry (written as infinity, as the host conversion would)
  status_negative_attention = 1u << 7,  ///< score: a negative attention or future signal (the host refuses it at the call)
};

/// Names of the raised bits, comma separated ("ok" when none).
inline std::string describe_status(std::uint32_t bits) {
  static constexpr const char* names[] = {"non-finite score", "non-finite feature", "fill of a token with no cached row",
                                          "approximator refused the history tags", "row index out of range",
                                          "plan level count over capacity", "conversion overflowed to infinity",
                                          "negative attention"};
  if (bits == 0) return "ok";
  std::string out;
  for (unsigned b = 0; b < sizeof names / sizeof names[0]; ++b)
    if (bits & (1u << b)) out += (out.empty() ? "" : ", ") + std::string(names[b]);
  const std::uint32_t known = (1u << (sizeof names / sizeof names[0])) - 1u;
  if (bits & ~known) out += (out.empty() ? "" : ", ") + std::string("unknown bits ") + std::to_string(bits & ~known);
  return out;
}

/// Waits for `stream` and returns the status word at `d_status`.
inline std::uint32_t read_status(const std::uint32_t* d_status, cudaStream_t stream) {
  std::uint32_t bits = 0;
  SPECDIFF_CUDA_CHECK(cudaMemcpyAsync(&bits, d_status, sizeof bits, cudaMemcpyDeviceToHost, stream));
  SPECDIFF_CUDA_CHECK(cudaStreamSynchronize(stream));
  return bits;
}

/// Throws std::runtime_error naming the raised bits, if any.
inline void throw_if_status(std::uint32_t bits, const char* what) {
  if (bits != 0) throw std::runtime_error(std::string(what) + ": device status " + std::to_string(bits) + " (" + describe_status(bits) + ")");
}

namespace detail {

#if defined(__CUDACC__)
__device__ inline void raise_status(std::uint32_t* status, std::uint32_t bit) {
  if (status != nullptr) atomicOr(status, bit);
}
#endif

}  // namespace detail
}  // namespace specdiff::gpu
