#!/usr/bin/env bash
# The Python package's CI part (docs/python.md): a virtual environment (.venv, git-ignored) with a CPU-usable torch,
# diffusers 0.42, nanobind, scikit-build-core and pytest from PyPI; the package built from python/ (the same headers);
# pytest over python/tests, whose equivalence tests run the C++ reference specdiff-pyref of the default build
# (build/default: scripts/test.sh builds it before calling this). pytest's "no tests ran" (exit 5) is a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_VERSION=${SPECDIFF_TORCH_VERSION:-2.15.0}
start=$(date +%s)
if [[ ! -x .venv/bin/python ]]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
VPIP=(.venv/bin/python -m pip -q --disable-pip-version-check)
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
  # PyPI's Linux torch wheel is built for CUDA and pulls ~2.5 GB of nvidia-* wheels. The CPU tests need none of
  # them at run time, only the shared libraries torch links against: take the wheel alone, its pure-Python
  # dependencies, and the CUDA libraries the machine's toolkit (/usr/local/cuda) lacks or has too old (~0.5 GB).
  # Where that does not load (no toolkit), fall back to the full install.
  "${VPIP[@]}" install --no-deps "torch==$TORCH_VERSION"
  "${VPIP[@]}" install filelock "typing-extensions>=4.13" "setuptools>=77.0.3" "sympy>=1.13.3" "networkx>=2.5.1" jinja2 "fsspec>=0.8.5" numpy
  if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
    "${VPIP[@]}" install --no-deps "nvidia-cufile==1.17.1.22.*" "nvidia-cusparselt-cu13==0.8.1" "nvidia-nvshmem-cu13==3.7.2" "nvidia-nccl-cu13==2.30.7"
  fi
  if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
    echo "python-test: torch $TORCH_VERSION does not load with the machine's CUDA libraries; installing it with all its dependencies"
    "${VPIP[@]}" install "torch==$TORCH_VERSION"
  fi
fi
"${VPIP[@]}" install "diffusers==0.42.*" "transformers>=5,<6" nanobind "scikit-build-core>=0.10" pytest safetensors
deps=$(date +%s)
command -v ccache >/dev/null && export CMAKE_CXX_COMPILER_LAUNCHER=ccache
"${VPIP[@]}" install --no-build-isolation ./python
built=$(date +%s)
rc=0
"$VPY" -m pytest -q -p no:cacheprovider python/tests || rc=$?
end=$(date +%s)
echo "python-test: environment $((deps - start)) s, package build $((built - deps)) s, pytest $((end - built)) s"
# The CUDA build of the extension (SPECDIFF_PY_CUDA=ON: specdiff::gpu::accelerator over CUDA tensors) where nvcc exists:
# compiled with the same CMake list pip runs, into build/python-cuda, and imported by python/tests/test_cuda.py, whose
# device tests skip without a GPU (saying so). SPECDIFF_SKIP_PYTHON_CUDA=1 skips it.
source scripts/env.sh
if [[ ${SPECDIFF_SKIP_PYTHON_CUDA:-0} != 1 ]] && command -v nvcc >/dev/null; then
  command -v ccache >/dev/null && export CMAKE_CUDA_COMPILER_LAUNCHER=ccache
  cuda_dir=build/python-cuda
  cmake -S python -B "$cuda_dir" -DCMAKE_BUILD_TYPE=Release -DSPECDIFF_PY_CUDA=ON -DPython_EXECUTABLE="$PWD/$VPY" \
    -Dnanobind_DIR="$("$VPY" -m nanobind --cmake_dir)" >/dev/null
  cmake --build "$cuda_dir" -j2
  pkg="$cuda_dir/pkg/specdiff"
  rm -rf "$pkg" && mkdir -p "$pkg" && cp python/specdiff/*.py "$pkg"/ && cp "$cuda_dir"/_core*.so "$pkg"/
  PYTHONPATH="$cuda_dir/pkg" "$VPY" -m pytest -q -p no:cacheprovider -rs python/tests/test_cuda.py || rc=$?
  echo "python-test: the CUDA build and its tests $(( $(date +%s) - end )) s"
fi
if [[ $rc -eq 5 ]]; then
  echo "python-test: pytest collected no tests: failing" >&2
  exit 1
fi
exit $rc
