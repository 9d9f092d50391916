// Test runner of the GPU engine's suites (tests/common/gpu_main.hpp: `--gpu` runs exit 77 without a usable device).
#define DOCTEST_CONFIG_IMPLEMENT
#include "../common/gpu_main.hpp"

int main(int argc, char** argv) { return testing::gpu_test_main(argc, argv); }
