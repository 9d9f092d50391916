// token_plan: the classifier's output for one sample — which level each token is in, and the index
// lists per level. Owns its buffers (sized once for N tokens); the per-step path only rewrites them.
#pragma once

#include <array>
#include <vector>

#include "common.hpp"

namespace specdiff {

class token_plan {
 public:
  token_plan() = default;
  explicit token_plan(index_t tokens) { resize(tokens); }

  void resize(index_t tokens) {
    if (tokens <= 0) detail::fail("tokens: must be positive, got ", tokens);
    order_.assign(static_cast<std::size_t>(tokens), 0);
    levels_.assign(static_cast<std::size_t>(tokens), level::compute);
    counts_ = {0, 0, 0};
  }

  index_t tokens() const { return static_cast<index_t>(order_.size()); }
  index_t count(level l) const { return counts_[slot(l)]; }

  /// Ascending token indices of one level.
  std::span<const index_t> indices(level l) const {
    return {order_.data() + offset(l), static_cast<std::size_t>(count(l))};
  }
  std::span<const index_t> compute() const { return indices(level::compute); }
  std::span<const index_t> reuse() const { return indices(level::reuse); }
  std::span<const index_t> approximate() const { return indices(level::approximate); }

  /// Level of every token, indexed by token.
  std::span<const level> levels() const { return levels_; }

  /// Writes the index lists from `levels()`: one stable pass, so every list comes out ascending.
  /// Classifiers fill `mutable_levels()` and then call this.
  void commit_levels() {
    counts_ = {0, 0, 0};
    for (level l : levels_) ++counts_[slot(l)];
    std::array<index_t, level_count> next = {0, counts_[0], counts_[0] + counts_[1]};
    for (index_t i = 0; i < tokens(); ++i) order_[static_cast<std::size_t>(next[slot(levels_[static_cast<std::size_t>(i)])]++)] = i;
  }
  std::span<level> mutable_levels() { return levels_; }

  /// Every token computed (dense steps).
  void set_all(level l) {
    for (auto& x : levels_) x = l;
    commit_levels();
  }

 private:
  static std::size_t slot(level l) { return static_cast<std::size_t>(l); }
  index_t offset(level l) const {
    index_t o = 0;
    for (std::size_t k = 0; k < slot(l); ++k) o += counts_[k];
    return o;
  }

  std::vector<index_t> order_;   // C1 | C2 | C3, each ascending
  std::vector<level> levels_;    // per token
  std::array<index_t, level_count> counts_{};
};

}  // namespace specdiff
