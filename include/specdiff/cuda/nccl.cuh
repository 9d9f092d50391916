// nccl_communicator: the NCCL model of specdiff::communicator (communicator.hpp) for DEVICE memory: the spans it
// takes hold device addresses, and every collective is enqueued on the caller's stream (stream-ordered: results
// are there when the stream reaches them, not when the call returns). Needs nccl.h (the CUDA toolkit's or
// NCCL's own) and linking NCCL. The ncclComm_t and the stream are the caller's. Compiled in CI, not yet run: the
// device-side sharded accelerator that would call it is not built (docs/scale-out.md).
#pragma once

#include "../communicator.hpp"  // first: its C++20 check stops a pre-C++20 build with the library's message
#include "error.cuh"

#include <cuda_runtime.h>
#include <nccl.h>

#include <cstdio>
#include <cstdlib>
#include <exception>

namespace specdiff::gpu {

class nccl_communicator {
 public:
  nccl_communicator(ncclComm_t comm, cudaStream_t stream) : comm_(comm), stream_(stream) {
    check(ncclCommUserRank(comm_, &rank_), "ncclCommUserRank");
    check(ncclCommCount(comm_, &size_), "ncclCommCount");
  }

  int rank() const noexcept { return rank_; }
  int size() const noexcept { return size_; }

  /// NCCL has no all-gather of variable sizes: one broadcast per rank (rank r the root of its rows), grouped.
  void all_gather(std::span<const float> send, std::span<const index_t> counts, std::span<float> recv) {
    detail::expect_gather_sizes(rank_, size_, send, counts, recv);
    check(ncclGroupStart(), "ncclGroupStart");
    std::size_t at = 0;
    for (int r = 0; r < size_; ++r) {
      const auto n = static_cast<std::size_t>(counts[static_cast<std::size_t>(r)]);
      const float* from = r == rank_ ? send.data() : nullptr;  // only the root's send buffer is read
      check(ncclBroadcast(from, recv.data() + at, n, ncclFloat32, r, comm_, stream_), "ncclBroadcast");
      at += n;
    }
    check(ncclGroupEnd(), "ncclGroupEnd");
  }

  /// Reduced on rank 0 and broadcast, so every rank holds bitwise the same sums.
  void all_reduce_sum(std::span<float> values) {
    check(ncclReduce(values.data(), values.data(), values.size(), ncclFloat32, ncclSum, 0, comm_, stream_), "ncclReduce");
    check(ncclBroadcast(values.data(), values.data(), values.size(), ncclFloat32, 0, comm_, stream_), "ncclBroadcast");
  }

  /// Equal blocks between every pair of ranks: one ncclSend and one ncclRecv per peer, grouped (NCCL's all-to-all).
  void all_to_all(std::span<const float> send, std::span<float> recv) {
    detail::expect_all_to_all_sizes(size_, send, recv);
    const std::size_t block = send.size() / static_cast<std::size_t>(size_);
    check(ncclGroupStart(), "ncclGroupStart");
    for (int r = 0; r < size_; ++r) {
      const std::size_t at = static_cast<std::size_t>(r) * block;
      check(ncclSend(send.data() + at, block, ncclFloat32, r, comm_, stream_), "ncclSend");
      check(ncclRecv(recv.data() + at, block, ncclFloat32, r, comm_, stream_), "ncclRecv");
    }
    check(ncclGroupEnd(), "ncclGroupEnd");
  }

  /// Blocks of per-rank sizes: one ncclSend and one ncclRecv per peer with its own count, grouped (a zero count
  /// posts nothing for that direction).
  void all_to_all_v(std::span<const float> send, std::span<const index_t> send_counts, std::span<float> recv,
                    std::span<const index_t> recv_counts) {
    detail::expect_all_to_all_v_sizes(size_, send, send_counts, recv, recv_counts);
    check(ncclGroupStart(), "ncclGroupStart");
    std::size_t sent = 0, received = 0;
    for (int r = 0; r < size_; ++r) {
      const auto out = static_cast<std::size_t>(send_counts[static_cast<std::size_t>(r)]);
      const auto in = static_cast<std::size_t>(recv_counts[static_cast<std::size_t>(r)]);
      if (out > 0) check(ncclSend(send.data() + sent, out, ncclFloat32, r, comm_, stream_), "ncclSend");
      if (in > 0) check(ncclRecv(recv.data() + received, in, ncclFloat32, r, comm_, stream_), "ncclRecv");
      sent += out;
      received += in;
    }
    check(ncclGroupEnd(), "ncclGroupEnd");
  }

  /// Every rank down: the message on stderr, the communicator aborted (peers' pending collectives fail), then
  /// this process ends with status 1 (a launcher such as mpirun or torchrun then stops the others).
  [[noreturn]] void fail(std::exception_ptr error) {
    const char* what = "unknown error";
    try {
      std::rethrow_exception(error);
    } catch (const std::exception& e) {
      what = e.what();
    } catch (...) {
    }
    std::fprintf(stderr, "specdiff: rank %d of %d: %s\n", rank_, size_, what);
    std::fflush(stderr);
    ncclCommAbort(comm_);
    std::exit(1);
  }

 private:
  static void check(ncclResult_t rc, const char* call) {
    if (rc != ncclSuccess) detail::fail(call, " failed: ", ncclGetErrorString(rc));
  }

  ncclComm_t comm_;
  cudaStream_t stream_;
  int rank_ = 0, size_ = 1;
};

static_assert(all_to_all_communicator<nccl_communicator>);

}  // namespace specdiff::gpu
