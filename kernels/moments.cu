// moments.cu -- per-group statistics of a contiguous (A, C, L) view, with an optional fused
// running-statistics epilogue (BatchNorm training forward, issue 4).
//
// Every norm views its input as a C-contiguous (A, C, L) array and takes one statistic per index
// of axis 1 over axes 0 and 2 (cupybn/_reference.py):
//
//     batch norm     (N, C, spatial)      instance norm  (1, N*C, spatial)
//     layer norm     (1, rows, row)       group norm     (1, N*G, C/G*spatial)
//
// Element (a, c, l) lives at offset (a * C + c) * L + l (64-bit). Group c holds A * L values.
//
// Work split (the planner, cupybn/_cuda/planner.py `moments_tiling`, picks the numbers):
//   * a 1-D grid of `slots * splits` blocks; block b works on group c = c_begin + b / splits and
//     on the `split` = b % splits -th interleaved share of it, so the grid does not depend on C:
//     C = 3 still gets hundreds of blocks;
//   * a group is A rows of L elements, each row cut into ceil(L / V) vectors of V = 16 / sizeof(T)
//     elements ("units"); unit u = a * ceil(L / V) + j. Thread t of split s visits units
//     u = s * blockDim + t, stepping by splits * blockDim (coalesced: neighbouring threads read
//     neighbouring 16-byte vectors), with one 16-byte load when the vector is aligned and whole
//     (load_vec handles row tails and misaligned rows element by element);
//   * every thread keeps a Welford state (n, mean, m2) in acc_t<T> (float; double for double
//     data) and folds in one vector at a time (the vector's own mean and m2 in registers, then
//     Chan's combine: one division per vector), in blocks of kFoldBlock vectors combined with
//     Chan's formula (Blocked, cupybn.cuh: no chain longer than 64 however many vectors a thread
//     gets); the block combines with Chan's formula (warp shuffles, then one warp over the warps).
//
// Cross-block combine, deterministic and self-cleaning (no float atomics, no memset):
//   * with splits > 1, thread 0 of each block stores its partial (n, mean, m2) in the workspace
//     at index b, fences, and takes a ticket from counters[slot] (an integer atomic);
//   * the block that draws the last ticket combines ALL partials of the group in index order
//     (lane k of warp 0 folds partials k, k + 32, ... in order, then a fixed shuffle tree), so
//     the result does not depend on which block finished last: bitwise repeatable. It then
//     writes counters[slot] = 0, so the counters are all zero again when the kernel ends and the
//     next launch on the stream can reuse them (the launcher zeroes them once, when allocated).
//
// Shifted data: every thread of every block of group c accumulates x - pivot, pivot = the group's
// first element (the same value everywhere, so the partials combine as usual). The mean is then
// split in two: save_mean = fl(pivot + mean(x - pivot)) and save_offset = the exact remainder, and
// the normalize step computes (x - save_mean) * scale + (bias - save_offset * scale): x minus a
// float near the data is exact, so a float32 channel with mean 1e4 and std 1e-2 normalizes to
// ~1e-6 instead of the ~5e-2 that a rounded float32 mean alone allows.
//
// Epilogue, by the thread that holds the group's final (n, mean, m2):
//   * save_mean[c] = mean, save_offset[c] (optional) as above, save_invstd[c] = 1 / sqrt(var + eps)
//     with var = m2 / n (biased), and 0 when var == 0 and eps == 0 (ATen's rule); nothing for an
//     empty group (n == 0);
//   * with running statistics (running_mean != nullptr) and n > 0:
//         factor = cumulative ? 1 / (num_batches_tracked + 1) : momentum
//         running_mean = (1 - factor) * running_mean + factor * mean
//         running_var  = (1 - factor) * running_var  + factor * var * n / (n - 1)
//     computed in acc_t<R> (float; double for double running statistics), stored as R;
//   * num_batches_tracked (an int64 on the device, or nullptr): every finalizer reads the old
//     value, fences, and takes a ticket from counters[slots]; the last one writes old + 1 and
//     resets that counter. So the counter moves once per launch, after every group has read it:
//     torch's order (num_batches_tracked += 1, then factor = 1 / num_batches_tracked) without a
//     host sync or an extra launch. An empty input (A * L == 0) still launches `slots` blocks of
//     empty groups so the counter moves, as on the CPU path.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "cupybn.cuh"

namespace cupybn {

// Threads per block of the statistics kernel (the planner may launch fewer: a multiple of 32).
constexpr int kMomentsThreads = 256;

// Reads a partial another block wrote (through L2: never a stale L1 line).
template <typename V>
__device__ __forceinline__ V load_shared_partial(const V* p) {
  return __ldcg(p);
}

// welford_push_vector (cupybn.cuh) folds one vector into a thread's Welford state.

// Finishes group c: saved statistics and the running-statistics update.
template <typename A, typename R>
__device__ __forceinline__ void moments_epilogue(index_t c, A pivot, const Welford<A>& w, A eps,
                                                 A* __restrict__ save_mean, A* __restrict__ save_invstd,
                                                 A* __restrict__ save_offset, R* __restrict__ running_mean,
                                                 R* __restrict__ running_var, long long nbt_new, double momentum,
                                                 int cumulative) {
  if (w.n == 0) return;
  typedef acc_t<R> U;
  const A var = div_rn(w.m2, (A)w.n);
  // w.mean is the mean of x - pivot. mean = pivot + w.mean, rounded; offset = the exact rest
  // (pivot - mean is exact: mean is within a factor 2 of pivot unless the data spreads far more
  // than its mean, and then the rest is tiny next to the spread anyway).
  const A mean = add_rn(pivot, w.mean);
  save_mean[c] = mean;
  if (save_offset != nullptr) save_offset[c] = add_rn(sub_rn(pivot, mean), w.mean);
  save_invstd[c] = inverse_std(var, eps, 1);
  if (running_mean == nullptr) return;
  U factor, keep;
  if (cumulative) {
    factor = div_rn(U(1), (U)nbt_new);
    keep = sub_rn(U(1), factor);
  } else {
    factor = convert<U>(momentum);
    keep = convert<U>(1.0 - momentum);
  }
  const double n = (double)w.n;
  const U unbias = convert<U>(n / (n - 1.0));
  const U old_mean = convert<U>(running_mean[c]);
  const U old_var = convert<U>(running_var[c]);
  const U new_mean = add_rn(mul_rn(keep, old_mean), mul_rn(factor, convert<U>(mean)));
  const U new_var = add_rn(mul_rn(keep, old_var), mul_rn(factor, mul_rn(convert<U>(var), unbias)));
  running_mean[c] = convert<R>(new_mean);
  running_var[c] = convert<R>(new_var);
}

// T: storage type of x. R: type of the running statistics (any float; unused without them).
// workspace: splits > 1 only, slots * splits partials laid out as [n (i64)][mean (A)][m2 (A)].
// counters: slots + 1 unsigned ints, zero on entry, zero again on exit.
template <typename T, typename R>
__global__ void __launch_bounds__(kMomentsThreads)
    moments_forward(const T* __restrict__ x, index_t A_extent, index_t C, index_t L, index_t c_begin, int splits,
                    acc_t<T>* __restrict__ save_mean, acc_t<T>* __restrict__ save_invstd,
                    acc_t<T>* __restrict__ save_offset, acc_t<T> eps,
                    R* __restrict__ running_mean, R* __restrict__ running_var, long long* num_batches_tracked,
                    double momentum, int cumulative, void* workspace, unsigned int* counters) {
  typedef acc_t<T> A;
  constexpr int V = vec_width<T>();
  __shared__ Welford<A> scratch[32];
  __shared__ int is_last;

  const int tid = (int)threadIdx.x;
  const unsigned int slots = gridDim.x / (unsigned int)splits;
  const unsigned int slot = blockIdx.x / (unsigned int)splits;
  const int split = (int)(blockIdx.x - slot * (unsigned int)splits);
  const index_t c = c_begin + (index_t)slot;
  const bool real = c < C;  // an empty input with C == 0 still runs one slot (the counter moves)

  // Welford runs on x - pivot, pivot = the group's first element: exact (Sterbenz) for data near
  // its mean, so a float32 group with mean 1e4 and std 1e-2 keeps its variance and its mean to a
  // fraction of the spread (a float32 mean alone is only good to ulp(1e4) = 1e-3 = 0.1 std).
  A pivot = A(0);
  if (real && A_extent > 0 && L > 0) pivot = convert<A>(__ldg(x + c * L));
  // blocked (cupybn.cuh): a thread may fold thousands of vectors (many huge groups leave few
  // blocks per group), and one long Welford chain drifts
  Blocked<Welford<A>> acc = blocked_empty(welford_empty<A>());
  if (real) {
    const index_t per_row = (L + V - 1) / V;  // vectors per row
    const index_t units = A_extent * per_row;
    const index_t row_stride = C * L;
    const T* base = x + c * L;
    // u = a * per_row + j, advanced by `step` without a 64-bit division per unit
    const index_t step = (index_t)splits * blockDim.x;
    const index_t step_a = step / per_row, step_j = step - step_a * per_row;
    index_t u = (index_t)split * blockDim.x + tid;
    index_t a = u / per_row, j = u - a * per_row;
    for (; u < units; u += step) {
      const index_t col = j * V;
      const int n = L - col < V ? (int)(L - col) : V;
      A v[V];
      load_vec<V>(base + a * row_stride + col, n, v);
#pragma unroll
      for (int k = 0; k < V; ++k) v[k] = sub_rn(v[k], pivot);
      welford_push_vector<V>(acc.cur, v, n);
      blocked_step(acc, WelfordOp(), welford_empty<A>());
      a += step_a;
      j += step_j;
      if (j >= per_row) {
        j -= per_row;
        ++a;
      }
    }
  }
  Welford<A> w = blocked_result(acc, WelfordOp());
  w = block_reduce(w, WelfordOp(), welford_empty<A>(), scratch);  // valid in thread 0

  if (splits > 1) {
    long long* ws_n = reinterpret_cast<long long*>(workspace);
    A* ws_mean = reinterpret_cast<A*>(ws_n + (index_t)gridDim.x);
    A* ws_m2 = ws_mean + (index_t)gridDim.x;
    if (tid == 0) {
      ws_n[blockIdx.x] = w.n;
      ws_mean[blockIdx.x] = w.mean;
      ws_m2[blockIdx.x] = w.m2;
      __threadfence();  // the partial is visible device-wide before the ticket is
    }
    if (!last_block_to_arrive(counters + slot, (unsigned int)splits, &is_last, tid == 0)) return;  // uniform
    if (tid < 32) {
      Welford<A> fold = welford_empty<A>();
      const index_t first = (index_t)slot * splits;
      for (int s = tid; s < splits; s += 32) {  // at most MOMENTS_MAX_SPLITS / 32 = 32 in a chain
        Welford<A> p;
        p.n = load_shared_partial(ws_n + first + s);
        p.mean = load_shared_partial(ws_mean + first + s);
        p.m2 = load_shared_partial(ws_m2 + first + s);
        fold = welford_combine(fold, p);
      }
      w = warp_reduce(fold, WelfordOp());  // fixed order: lane k takes lane k + delta
    }
    if (tid == 0) counters[slot] = 0u;  // every ticket of this group is drawn: reset for the next launch
  }

  if (tid != 0) return;
  long long nbt_new = 0;
  if (num_batches_tracked != nullptr) nbt_new = __ldcg(num_batches_tracked) + 1;
  if (real)
    moments_epilogue(c, pivot, w, eps, save_mean, save_invstd, save_offset, running_mean, running_var, nbt_new,
                     momentum, cumulative);
  if (num_batches_tracked != nullptr) {
    __threadfence();  // this group's read of the counter happens before its ticket
    const unsigned int done = atomicAdd(counters + slots, 1u);
    if (done == slots - 1u) {  // every group has read num_batches_tracked
      counters[slots] = 0u;
      *num_batches_tracked = nbt_new;
    }
  }
}


// ------------------------------------------------------------------------------------ L == 1: channels as columns
//
// moments_columns: the same contract as moments_forward for a view with L == 1 ((N, C) batch norm
// input, layer norm of rows of length 1 never gets here), where a group's values are one element
// per row with a stride of C: reading them a group per block would load one scalar per thread
// with a stride of C elements. Here a block covers a tile of kColumnLanes * V consecutive
// channels: thread (tx, ty) owns channels c0 = tile * kColumnLanes * V + tx * V .. + V - 1 and
// reads them with one 16-byte load per row, rows r = split * kColumnRows + ty, stepping by
// splits * kColumnRows; a warp reads 32 * 16 contiguous bytes of one row. Each thread keeps V
// Welford states (one count: every channel of a thread sees the same rows) on x - pivot, pivot =
// row 0 of the channel. The block folds its kColumnRows row-partials per channel in order
// (shared memory); with splits > 1 the partials go to the workspace ([n per block][mean][m2],
// kColumnLanes * V per block) and the last block of a tile (integer ticket per tile) folds the
// splits in index order, then resets the ticket. Epilogue and num_batches_tracked as above.
// Block: (kColumnLanes, kColumnRows) = 256 threads; 1-D grid of tiles * splits.

// (mean, m2) of na values += a partial (mean_b, m2_b) of nb values: welford_combine with the
// counts kept outside (the caller adds nb to na after folding every channel).
template <typename A>
__device__ __forceinline__ void chan_fold(A& mean, A& m2, long long na, A mean_b, A m2_b, long long nb) {
  Welford<A> a, b;
  a.mean = mean;
  a.m2 = m2;
  a.n = na;
  b.mean = mean_b;
  b.m2 = m2_b;
  b.n = nb;
  a = welford_combine(a, b);
  mean = a.mean;
  m2 = a.m2;
}

template <typename A>
__device__ __forceinline__ Welford<A> welford_of(A mean, A m2, long long n) {
  Welford<A> w;
  w.mean = mean;
  w.m2 = m2;
  w.n = n;
  return w;
}

constexpr int kColumnLanes = 32;
constexpr int kColumnRows = 8;

// moments_columns: a run (mean, m2, n) Chan-combined into the total (tmean, tm2, tn) and cleared,
// so that no Welford or combine chain grows longer than a run (see Blocked in cupybn.cuh).
template <typename A, int V>
__device__ __forceinline__ void fold_run(A (&tmean)[V], A (&tm2)[V], long long& tn, A (&mean)[V], A (&m2)[V],
                                         long long& n) {
#pragma unroll
  for (int k = 0; k < V; ++k) {
    chan_fold(tmean[k], tm2[k], tn, mean[k], m2[k], n);
    mean[k] = m2[k] = A(0);
  }
  tn += n;
  n = 0;
}

// moments_columns: the kColumnRows row partials of a block in shared memory, folded in row order
// into (mean, m2) by one thread of row 0; returns their count. The count is common to the V
// channels of a thread, so the combine keeps one count (and one division per partial).
template <typename A, int V, int kTile>
__device__ __forceinline__ long long fold_column_rows(A (&mean)[V], A (&m2)[V], const A (&sh_mean)[kColumnRows][kTile],
                                                      const A (&sh_m2)[kColumnRows][kTile],
                                                      const long long (&sh_n)[kColumnRows], int tx) {
  long long wn = 0;
#pragma unroll
  for (int k = 0; k < V; ++k) mean[k] = m2[k] = A(0);
  for (int row = 0; row < kColumnRows; ++row) {
    const long long pn = sh_n[row];
#pragma unroll
    for (int k = 0; k < V; ++k) chan_fold(mean[k], m2[k], wn, sh_mean[row][tx * V + k], sh_m2[row][tx * V + k], pn);
    wn += pn;
  }
  return wn;
}

template <typename T, typename R>
__global__ void __launch_bounds__(kMomentsThreads)
    moments_columns(const T* __restrict__ x, index_t A_extent, index_t C, index_t L, index_t c_begin, int splits,
                    acc_t<T>* __restrict__ save_mean, acc_t<T>* __restrict__ save_invstd,
                    acc_t<T>* __restrict__ save_offset, acc_t<T> eps,
                    R* __restrict__ running_mean, R* __restrict__ running_var, long long* num_batches_tracked,
                    double momentum, int cumulative, void* workspace, unsigned int* counters) {
  typedef acc_t<T> A;
  constexpr int V = vec_width<T>();
  constexpr int kTile = kColumnLanes * V;
  __shared__ A sh_mean[kColumnRows][kTile];
  __shared__ A sh_m2[kColumnRows][kTile];
  __shared__ long long sh_n[kColumnRows];
  __shared__ int is_last;

  const int tx = (int)threadIdx.x, ty = (int)threadIdx.y;
  const unsigned int slots = gridDim.x / (unsigned int)splits;
  const unsigned int slot = blockIdx.x / (unsigned int)splits;
  const int split = (int)(blockIdx.x - slot * (unsigned int)splits);
  const index_t c0 = c_begin + (index_t)slot * kTile + (index_t)tx * V;  // L == 1: channel == column
  const int nc = c0 >= C ? 0 : (C - c0 < V ? (int)(C - c0) : V);         // channels this thread owns

  A pivot[V], mean[V], m2[V];
  load_vec<V>(x + c0, nc, pivot);  // row 0 (A_extent >= 1: the planner never sends empty input here)
#pragma unroll
  for (int k = 0; k < V; ++k) mean[k] = m2[k] = A(0);
  // Welford per row in blocks of kFoldBlock rows ((mean, m2, n): the block; (tmean, tm2, tn): the
  // blocks so far, Chan-combined): a thread may visit thousands of rows (2048 for 2^24 rows on an
  // H100), and one Welford chain that long drifts (see Blocked in cupybn.cuh)
  A tmean[V], tm2[V];
#pragma unroll
  for (int k = 0; k < V; ++k) tmean[k] = tm2[k] = A(0);
  long long n = 0, tn = 0;
  if (nc > 0) {
    const index_t step = (index_t)splits * kColumnRows;
    for (index_t r = (index_t)split * kColumnRows + ty; r < A_extent; r += step) {
      A v[V];
      load_vec<V>(x + r * C + c0, nc, v);
      ++n;
      const A an = (A)n;
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const A d0 = sub_rn(v[k], pivot[k]);
        const A d = sub_rn(d0, mean[k]);
        mean[k] = add_rn(mean[k], div_rn(d, an));
        m2[k] = add_rn(m2[k], mul_rn(d, sub_rn(d0, mean[k])));
      }
      if (n == kFoldBlock) fold_run<A, V>(tmean, tm2, tn, mean, m2, n);
    }
  }
#pragma unroll
  for (int k = 0; k < V; ++k) {
    chan_fold(tmean[k], tm2[k], tn, mean[k], m2[k], n);  // bitwise the block itself when tn == 0
    sh_mean[ty][tx * V + k] = tmean[k];
    sh_m2[ty][tx * V + k] = tm2[k];
  }
  if (tx == 0) sh_n[ty] = tn + n;  // lane 0 always owns a channel (a tile starts below C); all lanes count alike
  __syncthreads();

  // row-partials of the block, folded in order by the ty == 0 threads
  long long wn = 0;
  if (ty == 0) wn = fold_column_rows<A, V>(mean, m2, sh_mean, sh_m2, sh_n, tx);

  if (splits > 1) {
    long long* ws_n = reinterpret_cast<long long*>(workspace);
    A* ws_mean = reinterpret_cast<A*>(ws_n + (index_t)gridDim.x);
    A* ws_m2 = ws_mean + (index_t)gridDim.x * kTile;
    if (ty == 0) {
      const index_t base = (index_t)blockIdx.x * kTile + tx * V;
#pragma unroll
      for (int k = 0; k < V; ++k) {
        ws_mean[base + k] = mean[k];
        ws_m2[base + k] = m2[k];
      }
      if (tx == 0) ws_n[blockIdx.x] = wn;
      __threadfence();
    }
    __syncthreads();  // every partial of the block is written and fenced
    // Written out rather than last_block_to_arrive(): the float16 instantiations sit at the
    // register limit of __launch_bounds__ and the helper's form tips them into spilling.
    if (tx == 0 && ty == 0) {
      const unsigned int ticket = atomicAdd(counters + slot, 1u);
      is_last = ticket == (unsigned int)splits - 1u;
    }
    __syncthreads();
    if (!is_last) return;  // uniform in the block
    __threadfence();
    // Row ty of the block folds splits ty, ty + kColumnRows, ... (up to 128) in runs of
    // kSplitRun, each run Chan-combined into (tmean, tm2, tn) -- no chain longer than 16, where
    // one thread folding all 1024 splits in a row drifts -- then row 0 folds the kColumnRows
    // results in order, as for the block's own rows. A fixed order: bitwise repeatable.
    {
      constexpr int kSplitRun = 16;
      const index_t first = (index_t)slot * splits;
      long long fn = 0;
      tn = 0;
#pragma unroll
      for (int k = 0; k < V; ++k) mean[k] = m2[k] = tmean[k] = tm2[k] = A(0);
      for (int s = ty, run = 0; s < splits; s += kColumnRows) {
        const long long pn = load_shared_partial(ws_n + first + s);
        const index_t base = (first + s) * kTile + tx * V;
#pragma unroll
        for (int k = 0; k < V; ++k)
          chan_fold(mean[k], m2[k], fn, load_shared_partial(ws_mean + base + k),
                    load_shared_partial(ws_m2 + base + k), pn);
        fn += pn;
        if (++run == kSplitRun) {
          fold_run<A, V>(tmean, tm2, tn, mean, m2, fn);
          run = 0;
        }
      }
#pragma unroll
      for (int k = 0; k < V; ++k) {
        chan_fold(tmean[k], tm2[k], tn, mean[k], m2[k], fn);
        mean[k] = tmean[k];
        m2[k] = tm2[k];
      }
      fn += tn;
      // (row 0 read the block's own row partials before the barriers above: sh_* is free)
#pragma unroll
      for (int k = 0; k < V; ++k) {
        sh_mean[ty][tx * V + k] = mean[k];
        sh_m2[ty][tx * V + k] = m2[k];
      }
      if (tx == 0) sh_n[ty] = fn;
      __syncthreads();
      if (ty == 0) wn = fold_column_rows<A, V>(mean, m2, sh_mean, sh_m2, sh_n, tx);
    }
    if (tx == 0 && ty == 0) counters[slot] = 0u;
  }

  long long nbt_new = 0;
  if (ty == 0) {
    if (num_batches_tracked != nullptr) nbt_new = __ldcg(num_batches_tracked) + 1;
#pragma unroll
    for (int k = 0; k < V; ++k)
      if (k < nc)
        moments_epilogue(c0 + k, pivot[k], welford_of(mean[k], m2[k], wn), eps, save_mean, save_invstd, save_offset, running_mean,
                         running_var, nbt_new, momentum, cumulative);
  }
  if (num_batches_tracked != nullptr) {
    __syncthreads();  // every read of the counter in this block happened
    if (tx == 0 && ty == 0) {
      __threadfence();
      const unsigned int done = atomicAdd(counters + slots, 1u);
      if (done == slots - 1u) {
        counters[slots] = 0u;
        *num_batches_tracked = __ldcg(num_batches_tracked) + 1;
      }
    }
  }
}

}  // namespace cupybn
