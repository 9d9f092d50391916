// mpi_communicator: the MPI model of specdiff::communicator (communicator.hpp) for host memory. Needs <mpi.h>: link
// MPI::MPI_CXX (CMake's FindMPI). The communicator handle is the caller's (MPI_COMM_WORLD, or a sub-communicator
// of the ranks sharing the token dimension); MPI_Init and MPI_Finalize are the caller's too.
#pragma once

#include "../communicator.hpp"

#include <mpi.h>

#include <cstdio>
#include <exception>
#include <limits>
#include <utility>
#include <vector>

namespace specdiff {

class mpi_communicator {
 public:
  explicit mpi_communicator(MPI_Comm comm = MPI_COMM_WORLD) : comm_(comm) {
    int initialized = 0;
    MPI_Initialized(&initialized);
    if (!initialized) detail::fail_logic("mpi_communicator: MPI is not initialized (call MPI_Init first)");
    MPI_Comm_rank(comm_, &rank_);
    MPI_Comm_size(comm_, &size_);
    counts_.resize(static_cast<std::size_t>(size_));
    displacements_.resize(static_cast<std::size_t>(size_));
    recv_counts_.resize(static_cast<std::size_t>(size_));
    recv_displacements_.resize(static_cast<std::size_t>(size_));
  }

  int rank() const noexcept { return rank_; }
  int size() const noexcept { return size_; }
  MPI_Comm handle() const noexcept { return comm_; }

  void all_gather(std::span<const float> send, std::span<const index_t> counts, std::span<float> recv) {
    detail::expect_gather_sizes(rank_, size_, send, counts, recv);
    if (recv.size() > static_cast<std::size_t>(std::numeric_limits<int>::max()))
      detail::fail("recv: ", recv.size(), " floats, more than MPI's int counts hold");
    int at = 0;
    for (std::size_t r = 0; r < counts_.size(); ++r) {
      counts_[r] = static_cast<int>(counts[r]);
      displacements_[r] = at;
      at += counts_[r];
    }
    check(MPI_Allgatherv(send.data(), static_cast<int>(send.size()), MPI_FLOAT, recv.data(), counts_.data(),
                         displacements_.data(), MPI_FLOAT, comm_),
          "MPI_Allgatherv");
  }

  /// Reduced on rank 0 and broadcast, so every rank holds bitwise the same sums (MPI_Allreduce may round
  /// differently on different ranks for more than two).
  void all_reduce_sum(std::span<float> values) {
    if (values.size() > static_cast<std::size_t>(std::numeric_limits<int>::max()))
      detail::fail("values: ", values.size(), " floats, more than MPI's int counts hold");
    const int n = static_cast<int>(values.size());
    if (rank_ == 0) check(MPI_Reduce(MPI_IN_PLACE, values.data(), n, MPI_FLOAT, MPI_SUM, 0, comm_), "MPI_Reduce");
    else check(MPI_Reduce(values.data(), nullptr, n, MPI_FLOAT, MPI_SUM, 0, comm_), "MPI_Reduce");
    check(MPI_Bcast(values.data(), n, MPI_FLOAT, 0, comm_), "MPI_Bcast");
  }

  /// Equal blocks between every pair of ranks (MPI_Alltoall).
  void all_to_all(std::span<const float> send, std::span<float> recv) {
    detail::expect_all_to_all_sizes(size_, send, recv);
    const std::size_t block = send.size() / static_cast<std::size_t>(size_);
    if (block > static_cast<std::size_t>(std::numeric_limits<int>::max()))
      detail::fail("send: blocks of ", block, " floats, more than MPI's int counts hold");
    check(MPI_Alltoall(send.data(), static_cast<int>(block), MPI_FLOAT, recv.data(), static_cast<int>(block), MPI_FLOAT, comm_),
          "MPI_Alltoall");
  }

  /// Blocks of per-rank sizes (MPI_Alltoallv); counts may be zero.
  void all_to_all_v(std::span<const float> send, std::span<const index_t> send_counts, std::span<float> recv,
                    std::span<const index_t> recv_counts) {
    detail::expect_all_to_all_v_sizes(size_, send, send_counts, recv, recv_counts);
    for (const auto& [name, floats] : {std::pair{"send", send.size()}, std::pair{"recv", recv.size()}})
      if (floats > static_cast<std::size_t>(std::numeric_limits<int>::max()))
        detail::fail(name, ": ", floats, " floats, more than MPI's int counts and displacements hold");
    int sent = 0, received = 0;
    for (std::size_t r = 0; r < counts_.size(); ++r) {
      counts_[r] = static_cast<int>(send_counts[r]);
      displacements_[r] = sent;
      sent += counts_[r];
      recv_counts_[r] = static_cast<int>(recv_counts[r]);
      recv_displacements_[r] = received;
      received += recv_counts_[r];
    }
    check(MPI_Alltoallv(send.data(), counts_.data(), displacements_.data(), MPI_FLOAT, recv.data(), recv_counts_.data(),
                        recv_displacements_.data(), MPI_FLOAT, comm_),
          "MPI_Alltoallv");
  }

  /// Every rank down: the message on stderr, then MPI_Abort (status 1).
  [[noreturn]] void fail(std::exception_ptr error) {
    const char* what = "unknown error";
    try {
      std::rethrow_exception(error);
    } catch (const std::exception& e) {
      what = e.what();
      abort_with(what);
    } catch (...) {
      abort_with(what);
    }
  }

 private:
  [[noreturn]] void abort_with(const char* what) {
    std::fprintf(stderr, "specdiff: rank %d of %d: %s\n", rank_, size_, what);
    std::fflush(stderr);
    MPI_Abort(comm_, 1);
    std::terminate();  // MPI_Abort does not return
  }
  void check(int rc, const char* call) {
    if (rc != MPI_SUCCESS) detail::fail(call, " failed with MPI error ", rc);
  }

  MPI_Comm comm_;
  int rank_ = 0, size_ = 1;
  std::vector<int> counts_, displacements_, recv_counts_, recv_displacements_;
};

static_assert(all_to_all_communicator<mpi_communicator>);

}  // namespace specdiff
