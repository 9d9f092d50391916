# Sourced by the scripts: puts nvcc on PATH where the CUDA toolkit is installed, so CMake finds it and
# SPECDIFF_CUDA defaults to ON (the CUDA tests then build, and run only where a GPU is present).
if [[ -x /usr/local/cuda/bin/nvcc && ":$PATH:" != *":/usr/local/cuda/bin:"* ]]; then
  export PATH=/usr/local/cuda/bin:$PATH
fi
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
