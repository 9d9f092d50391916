// Instantiates every public template with the library's own policies, so that package/strict_headers
// sees the warnings of template bodies too (a header compiled alone instantiates nothing).
#include <specdiff/specdiff.hpp>

// step_cache.hpp (relative_change_gate, relative_l1) holds no templates: the include above compiles all of it.

namespace specdiff {
template class host_cache_store<float>;
template class host_cache_store<bfloat16>;
template class accelerator<specdiff_scorer, self_speculation, three_level_classifier, step_schedule>;
template class accelerator<toca_scorer, no_speculation, top_k_classifier, step_schedule, latest, host_cache_store<bfloat16>>;
template class accelerator<feature_change_scorer, no_speculation, all_reuse_classifier, dense_schedule, taylor<2>>;
template class accelerator<uniform_scorer, no_speculation, all_approximate_classifier, step_schedule, linear>;
template class accelerator<uniform_scorer, no_speculation, all_approximate_classifier, step_schedule, taylorseer<2>>;
template void score_tokens(const specdiff_scorer&, const score_inputs&, std::span<float>);
template void score_tokens(const feature_change_scorer&, const score_inputs&, std::span<float>);
template std::vector<float> aligned_speculative_timesteps(std::span<const float>, index_t, const step_schedule&);
template void host_cache_store<float>::fill(index_t, index_t, float, std::span<const index_t>, const taylor<4>&, matrix_view<float>) const;
template void host_cache_store<float>::fill(index_t, index_t, float, std::span<const index_t>, const taylorseer<4>&, matrix_view<float>) const;
template void host_cache_store<bfloat16>::fill(index_t, index_t, float, std::span<const index_t>, const specdiff_weighted&, matrix_view<float>) const;
template index_t detail::checked_product<index_t>(std::string_view, int, int, int);
template std::size_t detail::checked_product<std::size_t>(std::string_view, long, int);
}  // namespace specdiff

int main() { return 0; }
