// A user's program, built against the installed package or the source tree: it compiles the README's
// snippet (extracted by consume.cmake into readme_snippet.inc) around a toy model, then checks what the
// snippet produced. Exits non-zero on a wrong answer.
#include <specdiff/specdiff.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <span>
#include <vector>

namespace {

// The toy model: a token's output row and the attention it receives are smooth functions of (sample,
// token, t), so cached rows are good approximations and every check below is exact or tight.
float feature(int sample, int token, int c, float t) { return std::sin(0.2f * static_cast<float>(token + 5 * sample + c)) * t / 1000.f; }

struct toy_model {
  int N, B, F;
  std::vector<std::vector<specdiff::index_t>> calls;  // the tokens each call ran
  void operator()(float t, std::span<const specdiff::index_t> tokens, std::vector<float>& rows, std::vector<float>& attention) {
    calls.emplace_back(tokens.begin(), tokens.end());
    const int n = tokens.empty() ? N : static_cast<int>(tokens.size()) / B;
    for (int b = 0; b < B; ++b)
      for (int i = 0; i < n; ++i) {
        const int token = tokens.empty() ? i : tokens[static_cast<std::size_t>(b * n + i)];
        for (int c = 0; c < F; ++c) rows[static_cast<std::size_t>((b * n + i) * F + c)] = feature(b, token, c, t);
      }
    for (int r = 0; r < B * N; ++r) attention[static_cast<std::size_t>(r)] = 1.f + std::cos(0.05f * static_cast<float>(r) + t / 300.f);
  }
};

// The README's loop, unchanged, for a run of `steps` steps with the default schedule.
int run_readme_loop(const specdiff::index_t steps) {
  const specdiff::index_t N = 64, B = 2, F = 4;
  std::vector<float> t;
  for (int k = 0; k < steps; ++k) t.push_back(1000.f * (1.f - static_cast<float>(k) / steps));
  std::vector<float> rows(B * N * F), output(B * N * F), attention(B * N);
  toy_model model{N, B, F, {}};

#include "readme_snippet.inc"

  // Under the default schedule steps 0-3 are dense and the speculative pass has min(2, steps) steps.
  const auto speculative = static_cast<std::size_t>(std::min<specdiff::index_t>(2, steps));
  if (model.calls.size() != static_cast<std::size_t>(steps) + speculative)
    return std::printf("steps %d: %zu model calls, want %zu\n", steps, model.calls.size(), static_cast<std::size_t>(steps) + speculative), 1;
  for (float v : output)
    if (!std::isfinite(v)) return std::printf("steps %d: non-finite output\n", steps), 1;
  if (steps <= 4)  // every step dense: the last ran every token of every sample
    return model.calls.back().size() == static_cast<std::size_t>(B * N) ? 0 : (std::printf("steps %d: the last step is not dense\n", steps), 1);
  // The last step is partial: C1 rows are the model's, and C1 held ceil((1 - 0.9) * 64) = 7 tokens per sample.
  const auto& last = model.calls.back();
  if (last.size() != static_cast<std::size_t>(B * 7)) return std::printf("last call ran %zu tokens, want %d\n", last.size(), B * 7), 1;
  for (int b = 0; b < B; ++b)
    for (int i = 0; i < 7; ++i) {
      const int token = last[static_cast<std::size_t>(b * 7 + i)];
      if (output[static_cast<std::size_t>((b * N + token) * F)] != feature(b, token, 0, t.back())) return std::printf("C1 row differs\n"), 1;
    }
  return 0;
}

}  // namespace

int main() {
  specdiff::three_level_classifier classify(0.5);
  classify.prepare(8);
  specdiff::token_plan plan(8);
  const std::vector<float> log_score = {0, 7, 1, 6, 2, 5, 3, 4};
  classify.classify(log_score, plan);
  const std::vector<specdiff::index_t> want = {1, 3, 5, 7};
  const auto got = plan.compute();
  if (!std::equal(got.begin(), got.end(), want.begin(), want.end())) return 1;
  for (const specdiff::index_t steps : {1, 8, 20, 28, 50})
    if (run_readme_loop(steps) != 0) return 1;
  return 0;
}
