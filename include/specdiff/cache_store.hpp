// host_cache_store: per (layer, site), the last `history_depth` rows of every token, each tagged with
// the timestep it was computed at. Memory is allocated once at construction.
#pragma once

#include <algorithm>
#include <array>
#include <limits>
#include <vector>

#include "approximators.hpp"
#include "concepts.hpp"
#include "storage.hpp"

namespace specdiff {

template <storage_type Storage = float>
class host_cache_store {
  using traits = storage_traits<Storage>;

 public:
  explicit host_cache_store(cache_shape shape) : shape_((shape.validate(), shape)) {
    const std::size_t rows = size(shape_.layers) * size(shape_.sites) * size(shape_.tokens);
    data_.resize(rows * size(shape_.history_depth) * size(shape_.dim));
    tags_.resize(rows * size(shape_.history_depth));
    head_.assign(rows, 0);
    count_.assign(rows, 0);
  }

  const cache_shape& shape() const { return shape_; }

  /// Bytes held for features and their bookkeeping.
  std::size_t memory_bytes() const {
    return data_.size() * sizeof(Storage) + tags_.size() * sizeof(float) + head_.size() + count_.size();
  }

  /// Forgets every row (a new image); keeps the memory.
  void clear() { std::fill(count_.begin(), count_.end(), std::uint8_t{0}); }

  /// Pushes a new history entry for every token: rows[i] is token i.
  void write(index_t layer, index_t site, float t, matrix_view<const float> rows) {
    expect_slot(layer, site);
    detail::expect_matrix("rows", rows, shape_.tokens, shape_.dim);
    expect_tag(t);
    for (index_t i = 0; i < shape_.tokens; ++i) detail::expect_finite_row("rows", rows, i);
    for (index_t i = 0; i < shape_.tokens; ++i) push(layer, site, i, t, rows.row_ptr(i));
  }

  /// Pushes a new entry for the listed tokens (strictly ascending) from compact rows: rows[i] is token
  /// tokens[i] (what a partial forward produces).
  void scatter(index_t layer, index_t site, float t, std::span<const index_t> tokens, matrix_view<const float> rows) {
    expect_slot(layer, site);
    detail::expect_matrix("rows", rows, static_cast<index_t>(tokens.size()), shape_.dim);
    expect_tag(t);
    expect_tokens(tokens);
    for (std::size_t i = 0; i < tokens.size(); ++i) detail::expect_finite_row("rows", rows, static_cast<index_t>(i));
    for (std::size_t i = 0; i < tokens.size(); ++i) push(layer, site, tokens[i], t, rows.row_ptr(static_cast<index_t>(i)));
  }

  /// Pushes a new entry for the listed tokens (strictly ascending), read in place from a full matrix:
  /// row tokens[i] of `all`.
  void write_rows(index_t layer, index_t site, float t, std::span<const index_t> tokens, matrix_view<const float> all) {
    expect_slot(layer, site);
    detail::expect_matrix("all", all, shape_.tokens, shape_.dim);
    expect_tag(t);
    expect_tokens(tokens);
    for (index_t token : tokens) detail::expect_finite_row("all", all, token);
    for (index_t token : tokens) push(layer, site, token, t, all.row_ptr(token));
  }

  /// For each listed token, writes row `token` of `out` (a full tokens x dim matrix) with the
  /// approximator's mix of the token's history at timestep t.
  template <approximator A>
  void fill(index_t layer, index_t site, float t, std::span<const index_t> tokens, const A& approx, matrix_view<float> out) const {
    expect_slot(layer, site);
    detail::expect_matrix("out", out, shape_.tokens, shape_.dim);
    for_each_mix(layer, site, t, tokens, approx, [&](std::size_t, index_t token, index_t c, float mixed) { out.row_ptr(token)[c] = mixed; });
  }

  /// Verification: what the approximator would have predicted at timestep t for the listed tokens, against
  /// their computed rows — row truth_rows[i] of `truth` is token tokens[i]'s — before those rows are cached.
  /// Writes the squared L2 distance per token to err2[i] and the squared norm of its computed row to norm2[i].
  template <approximator A>
  void prediction_error(index_t layer, index_t site, float t, std::span<const index_t> tokens, const A& approx,
                        matrix_view<const float> truth, std::span<const index_t> truth_rows, std::span<float> err2,
                        std::span<float> norm2) const {
    expect_slot(layer, site);
    if (truth.cols != shape_.dim) detail::fail("truth: expected ", shape_.dim, " columns, got ", truth.cols);
    detail::expect_size("truth_rows", truth_rows.size(), tokens.size());
    detail::expect_size("err2", err2.size(), tokens.size());
    detail::expect_size("norm2", norm2.size(), tokens.size());
    for (index_t r : truth_rows) detail::expect_index("truth_rows[i]", r, truth.rows);
    std::fill(err2.begin(), err2.end(), 0.f);
    std::fill(norm2.begin(), norm2.end(), 0.f);
    for_each_mix(layer, site, t, tokens, approx, [&](std::size_t i, index_t, index_t c, float mixed) {
      const float y = truth.row_ptr(truth_rows[i])[c], d = mixed - y;
      err2[i] += d * d;
      norm2[i] += y * y;
    });
  }

  /// C2: each listed token's latest cached row, unchanged (`t` is not read).
  void fill(index_t layer, index_t site, float t, std::span<const index_t> tokens, matrix_view<float> out) const {
    fill(layer, site, t, tokens, latest{}, out);
  }

  /// Per token, the L2 norm of (latest - previous) row; +inf where fewer than two rows are cached
  /// (unknown change: a scorer should compute such a token).
  void change_norm(index_t layer, index_t site, std::span<float> out) const {
    expect_slot(layer, site);
    detail::expect_size("out", out.size(), static_cast<std::size_t>(shape_.tokens));
    for (index_t i = 0; i < shape_.tokens; ++i) {
      if (entries(layer, site, i) < 2) {
        out[static_cast<std::size_t>(i)] = std::numeric_limits<float>::infinity();
        continue;
      }
      const Storage* a = entry(layer, site, i, 0);
      const Storage* b = entry(layer, site, i, 1);
      double sum = 0.0;
      for (index_t c = 0; c < shape_.dim; ++c) {
        const double d = static_cast<double>(traits::load(a[c])) - static_cast<double>(traits::load(b[c]));
        sum += d * d;
      }
      out[static_cast<std::size_t>(i)] = static_cast<float>(std::sqrt(sum));
    }
  }

  /// Number of rows cached for a token (0..history_depth).
  int entries(index_t layer, index_t site, index_t token) const { return count_[row_id(layer, site, token)]; }

  /// The k-th most recent row of a token (k = 0 is the latest) and its tag.
  std::span<const Storage> history(index_t layer, index_t site, index_t token, int k) const {
    expect_slot(layer, site);
    detail::expect_index("token", token, shape_.tokens);
    if (k < 0 || k >= entries(layer, site, token))
      detail::fail_logic("history: layer ", layer, " site ", site, " token ", token, " has ", entries(layer, site, token), " rows cached, asked for row ", k);
    return {entry(layer, site, token, k), static_cast<std::size_t>(shape_.dim)};
  }
  float history_tag(index_t layer, index_t site, index_t token, int k) const {
    (void)history(layer, site, token, k);
    return tag(layer, site, token, k);
  }

 private:
  void expect_slot(index_t layer, index_t site) const {
    detail::expect_index("layer", layer, shape_.layers);
    detail::expect_index("site", site, shape_.sites);
  }

  // Indices are validated before use; sizes are positive (cache_shape::validate).
  static std::size_t size(index_t v) { return static_cast<std::size_t>(v); }
  std::size_t row_id(index_t layer, index_t site, index_t token) const {
    return (size(layer) * size(shape_.sites) + size(site)) * size(shape_.tokens) + size(token);
  }
  // Ring slot of the k-th most recent entry.
  std::size_t slot(std::size_t row, int k) const {
    const int h = shape_.history_depth;
    return static_cast<std::size_t>((head_[row] - k + h) % h);
  }
  const Storage* entry(index_t layer, index_t site, index_t token, int k) const {
    const std::size_t row = row_id(layer, site, token);
    return data_.data() + (row * size(shape_.history_depth) + slot(row, k)) * size(shape_.dim);
  }
  float tag(index_t layer, index_t site, index_t token, int k) const {
    const std::size_t row = row_id(layer, site, token);
    return tags_[row * size(shape_.history_depth) + slot(row, k)];
  }

  // The approximator's mix of each listed token's history at t, handed out value by value:
  // f(i, token, column, mixed) for the i-th listed token. Indices and cached entries are checked before f first
  // runs; an approximator refusing a token's tags (a repeated tag) still stops it midway.
  template <approximator A, class F>
  void for_each_mix(index_t layer, index_t site, float t, std::span<const index_t> tokens, const A& approx, F&& f) const {
    for (index_t token : tokens) {
      detail::expect_index("tokens[i]", token, shape_.tokens);
      if (entries(layer, site, token) == 0)
        detail::fail_logic("fill: layer ", layer, " site ", site, " token ", token, " has no cached feature (never written)");
    }
    std::array<float, cache_shape::max_history> tags{}, w{}, last_tags{};
    std::array<const Storage*, cache_shape::max_history> src{};
    int last_n = 0;  // tokens refreshed at the same steps share their weights: compute them once per run
    for (std::size_t i = 0; i < tokens.size(); ++i) {
      const index_t token = tokens[i];
      const int n = std::min<int>(A::depth, entries(layer, site, token));
      for (int k = 0; k < n; ++k) {
        tags[static_cast<std::size_t>(k)] = tag(layer, site, token, k);
        src[static_cast<std::size_t>(k)] = entry(layer, site, token, k);
      }
      if (n != last_n || !std::equal(tags.begin(), tags.begin() + n, last_tags.begin())) {
        if (approx.weights(tags.data(), n, t, w.data()) != n)
          detail::fail_logic("fill: token ", token, " history tags do not allow this approximator (repeated timestep ", tags[0], ")");
        last_tags = tags;
        last_n = n;
      }
      for (index_t c = 0; c < shape_.dim; ++c) {
        float acc = 0.f;
        for (int k = 0; k < n; ++k) acc += w[static_cast<std::size_t>(k)] * traits::load(src[static_cast<std::size_t>(k)][c]);
        f(i, token, c, acc);
      }
    }
  }

  static void expect_tag(float t) {
    if (!std::isfinite(t)) detail::fail("t: timestep is not finite (", t, ")");
  }
  void expect_tokens(std::span<const index_t> tokens) const {
    for (std::size_t i = 0; i < tokens.size(); ++i) {
      detail::expect_index("tokens[i]", tokens[i], shape_.tokens);
      if (i > 0 && tokens[i] <= tokens[i - 1])
        detail::fail("tokens: must be strictly ascending, got ", tokens[i - 1], " then ", tokens[i], " at ", i);
    }
  }

  // Callers have validated everything: push cannot fail, so a write is all or nothing.
  void push(index_t layer, index_t site, index_t token, float t, const float* src) {
    const std::size_t row = row_id(layer, site, token);
    const int h = shape_.history_depth;
    const std::uint8_t next = count_[row] == 0 ? 0 : static_cast<std::uint8_t>((head_[row] + 1) % h);
    const std::size_t at = row * size(h) + next;
    Storage* dst = data_.data() + at * size(shape_.dim);
    for (index_t c = 0; c < shape_.dim; ++c) dst[c] = traits::store(src[c]);
    tags_[at] = t;
    head_[row] = next;
    if (count_[row] < h) ++count_[row];
  }

  cache_shape shape_;
  std::vector<Storage> data_;       // [layer][site][token][slot][dim]
  std::vector<float> tags_;         // [layer][site][token][slot]
  std::vector<std::uint8_t> head_;  // slot of the latest entry
  std::vector<std::uint8_t> count_; // entries cached
};

static_assert(cache_store<host_cache_store<float>> && cache_store<host_cache_store<bfloat16>>);

}  // namespace specdiff
