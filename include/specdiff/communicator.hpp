// communicator: the few collectives SpecDiff's sharded mode needs (sharded.hpp), as a concept an engine's runtime
// satisfies (MPI: <specdiff/mpi/communicator.hpp>; NCCL: <specdiff/cuda/nccl.cuh>; torch.distributed or another
// runtime: a small adapter), and single_process, the trivial model for one rank.
//
// Contract (every model):
//   rank(), size()            this process's rank in [0, size), the ranks sharing the token dimension (size >= 1).
//   all_gather(send, counts, recv)
//                             rank r contributes counts[r] floats (its `send`, send.size() == counts[rank()]); every
//                             rank receives all contributions concatenated in rank order (recv.size() == sum of counts).
//                             Rows of different sizes: a shard of T tokens over P ranks is uneven when P does not divide T.
//   all_reduce_sum(values)    in place: every rank ends with the element-wise sum over ranks, and BITWISE THE SAME
//                             sum on every rank (float addition is not associative: a model whose reduction may
//                             round differently on different ranks must reduce to one rank and broadcast, as the MPI
//                             model does), so that every rank derives the same plan from it.
//   fail(error)               [[noreturn]]: a call on one rank failed (bad input, a refusal); the others may already
//                             wait in a collective, so the model must not simply throw on one rank and leave them
//                             hanging. single_process rethrows; the MPI model writes "specdiff: rank r of P: <what>"
//                             to stderr and calls MPI_Abort, which brings every rank down with a non-zero status.
// Collectives are blocking and called by every rank in the same order with the same sizes (counts agree on every
// rank). The calls must not allocate (the models size their scratch once, at construction).
//
// all_to_all_communicator (a refinement: what an engine's Ulysses attention needs, not the sharded accelerator):
//   all_to_all(send, recv)    send and recv hold size() equal blocks (send.size() == recv.size(), a multiple of
//                             size()); block q of `send` goes to rank q, and block r of `recv` is what rank r sent
//                             here (MPI_Alltoall): [tokens/P, all heads] rows become [all tokens, heads/P] and back.
//   all_to_all_v(send, send_counts, recv, recv_counts)
//                             blocks of per-rank sizes (MPI_Alltoallv): `send` is size() consecutive blocks, block q of
//                             send_counts[q] floats going to rank q; `recv` is size() consecutive blocks, block r of
//                             recv_counts[r] floats coming from rank r. recv_counts[r] here must equal send_counts[rank()]
//                             on rank r (the caller's to keep, as with MPI; a model cannot check it without a collective).
//                             Counts may be zero: a Ulysses rank whose share of a token subset is empty sends nothing
//                             and still receives the others' rows.
//                             Every model shipped here has both.
#pragma once

#include <algorithm>
#include <concepts>
#include <cstring>
#include <exception>
#include <numeric>
#include <span>
#include <tuple>

#include "common.hpp"

namespace specdiff {

template <class C>
concept communicator = requires(C& c, const C& cc, std::span<const float> send, std::span<const index_t> counts,
                                std::span<float> recv, std::exception_ptr error) {
  { cc.rank() } -> std::convertible_to<int>;
  { cc.size() } -> std::convertible_to<int>;
  c.all_gather(send, counts, recv);
  c.all_reduce_sum(recv);
  c.fail(error);
};

namespace detail {
/// The size checks every model makes before a collective (the same message everywhere).
inline void expect_gather_sizes(int rank, int size, std::span<const float> send, std::span<const index_t> counts,
                                std::span<float> recv) {
  expect_size("counts", counts.size(), static_cast<std::size_t>(size));
  std::size_t total = 0;
  for (std::size_t r = 0; r < counts.size(); ++r) {
    if (counts[r] < 0) fail("counts[", r, "]: must be >= 0, got ", counts[r]);
    total += static_cast<std::size_t>(counts[r]);
  }
  expect_size("send", send.size(), static_cast<std::size_t>(counts[static_cast<std::size_t>(rank)]));
  expect_size("recv", recv.size(), total);
}
}  // namespace detail

/// A communicator that also exchanges equal blocks between every pair of ranks (see the contract above).
template <class C>
concept all_to_all_communicator = communicator<C> && requires(C& c, std::span<const float> send, std::span<float> recv,
                                                              std::span<const index_t> counts) {
  c.all_to_all(send, recv);
  c.all_to_all_v(send, counts, recv, counts);
};

namespace detail {
/// The size checks every model makes before all_to_all (the same message everywhere).
inline void expect_all_to_all_sizes(int size, std::span<const float> send, std::span<float> recv) {
  expect_size("recv", recv.size(), send.size());
  if (send.size() % static_cast<std::size_t>(size) != 0)
    fail("send: ", send.size(), " floats do not split into ", size, " equal blocks (one per rank)");
}
/// The size checks every model makes before all_to_all_v: one count per rank, none negative, and the counts adding
/// up to the span they describe. Returns nothing; fails naming the argument and its value.
inline void expect_all_to_all_v_sizes(int size, std::span<const float> send, std::span<const index_t> send_counts,
                                      std::span<float> recv, std::span<const index_t> recv_counts) {
  for (const auto& [name, counts, span_name, floats] :
       {std::tuple{"send_counts", send_counts, "send", send.size()}, std::tuple{"recv_counts", recv_counts, "recv", recv.size()}}) {
    expect_size(name, counts.size(), static_cast<std::size_t>(size));
    std::size_t total = 0;
    for (std::size_t r = 0; r < counts.size(); ++r) {
      if (counts[r] < 0) fail(name, "[", r, "]: must be >= 0, got ", counts[r]);
      total += static_cast<std::size_t>(counts[r]);
    }
    if (total != floats) fail(span_name, ": holds ", floats, " floats, but ", name, " add up to ", total);
  }
}
}  // namespace detail

/// One rank: all_gather and all_to_all copy, all_reduce_sum leaves the values as they are, fail rethrows.
struct single_process {
  int rank() const noexcept { return 0; }
  int size() const noexcept { return 1; }
  void all_gather(std::span<const float> send, std::span<const index_t> counts, std::span<float> recv) {
    detail::expect_gather_sizes(0, 1, send, counts, recv);
    if (!send.empty()) std::memmove(recv.data(), send.data(), send.size_bytes());
  }
  void all_reduce_sum(std::span<float>) {}
  void all_to_all(std::span<const float> send, std::span<float> recv) {
    detail::expect_all_to_all_sizes(1, send, recv);
    if (!send.empty()) std::memmove(recv.data(), send.data(), send.size_bytes());
  }
  void all_to_all_v(std::span<const float> send, std::span<const index_t> send_counts, std::span<float> recv,
                    std::span<const index_t> recv_counts) {
    detail::expect_all_to_all_v_sizes(1, send, send_counts, recv, recv_counts);
    if (!send.empty()) std::memmove(recv.data(), send.data(), send.size_bytes());
  }
  [[noreturn]] void fail(std::exception_ptr error) { std::rethrow_exception(error); }
};

static_assert(all_to_all_communicator<single_process>);

/// A contiguous token shard: rank r of P owns tokens [begin, begin + count) of T; the first T % P ranks hold one
/// token more (so every shard is non-empty when T >= P).
struct token_shard {
  index_t begin = 0, count = 0;

  static token_shard of(index_t tokens, int rank, int size) {
    if (size < 1) detail::fail("size: must be >= 1, got ", size);
    if (rank < 0 || rank >= size) detail::fail("rank: ", rank, " is out of range [0, ", size, ")");
    if (tokens < size) detail::fail("tokens: ", tokens, " tokens cannot be shared by ", size, " ranks (each needs one)");
    const index_t base = tokens / size, extra = tokens % size;
    return {rank * base + std::min<index_t>(rank, extra), base + (rank < extra ? 1 : 0)};
  }
};

}  // namespace specdiff
