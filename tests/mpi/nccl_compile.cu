// Compiles the NCCL model of the communicator (include/specdiff/cuda/nccl.cuh); nothing runs it here (no GPU,
// and the device-side sharded accelerator is not built). Instantiates every member.
#include <specdiff/cuda/nccl.cuh>

void specdiff_nccl_compile_check(ncclComm_t comm, cudaStream_t stream, float* device, std::size_t n) {
  specdiff::gpu::nccl_communicator c(comm, stream);
  const specdiff::index_t counts[2] = {static_cast<specdiff::index_t>(n), 0};
  c.all_gather(std::span<const float>(device, n), std::span<const specdiff::index_t>(counts, 2), std::span<float>(device + n, n));
  c.all_reduce_sum(std::span<float>(device, n));
  c.all_to_all(std::span<const float>(device, 2 * n), std::span<float>(device + 2 * n, 2 * n));
  if (c.rank() < 0 || c.size() < 1) c.fail(std::make_exception_ptr(std::runtime_error("unreachable")));
}
