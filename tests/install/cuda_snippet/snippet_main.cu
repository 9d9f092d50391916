// docs/cuda.md's device integration, compiled as a user would (package/cuda_doc_snippet_*): the ```cpp block
// after the cuda-snippet marker, extracted by cuda_snippet.cmake into cuda_snippet.inc, inside a function
// with a toy engine's stand-ins. Built with -Wall -Wextra -Wconversion -Wsign-conversion -Werror against the
// installed package, through specdiff::cuda and through a plain -I. Compiled, not run (CI has no GPU).
#include <specdiff/cuda/specdiff.cuh>

#include <span>
#include <vector>

namespace {

// The engine's side: a forward over `queries` tokens per sample that, in each of its layers, hands the
// layer's Q, K and LSE to the probe (here with null pointers: this program only compiles).
struct toy_engine {
  specdiff::index_t layers = 2;
  template <class Probe, class Row>
  void forward(float /*t*/, specdiff::index_t queries, const Row* /*in*/, Row* /*out*/, Probe& probe, cudaStream_t stream) const {
    for (specdiff::index_t l = 0; l < layers; ++l) probe.add_layer(nullptr, queries, nullptr, nullptr, stream);
  }
};

[[maybe_unused]] void integrate(specdiff::index_t N, specdiff::index_t B, specdiff::index_t D, specdiff::index_t H, specdiff::index_t d,
                                specdiff::index_t steps, std::span<const float> t, specdiff::gpu::device_matrix<specdiff::bfloat16> x,
                                specdiff::gpu::device_matrix<specdiff::bfloat16> y, specdiff::bfloat16* x_c1, specdiff::bfloat16* y_c1,
                                const toy_engine& engine, cudaStream_t stream) {
#include "cuda_snippet.inc"
}

}  // namespace

int main() { return 0; }
