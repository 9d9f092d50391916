// A user's program: plans one step with the three-level classifier. Exits non-zero on a wrong answer.
#include <specdiff/specdiff.hpp>

#include <vector>

int main() {
  specdiff::three_level_classifier classify(8, 0.5);
  specdiff::token_plan plan(8);
  const std::vector<float> log_score = {0, 7, 1, 6, 2, 5, 3, 4};
  classify.classify(log_score, plan);
  const std::vector<specdiff::index_t> want = {1, 3, 5, 7};
  const auto got = plan.compute();
  return std::equal(got.begin(), got.end(), want.begin(), want.end()) ? 0 : 1;
}
