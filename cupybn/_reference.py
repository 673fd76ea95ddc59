"""The array-API reference implementation: the math of every norm, written once for any framework.

All four norms reduce groups of elements and then normalize each element with its group's
statistics. Here every input is viewed as a 3-d array ``(A, C, L)`` whose statistics are taken
over axes 0 and 2, one per index of axis 1:

=============  =====================  ==========================
norm           view ``(A, C, L)``      one statistic per
=============  =====================  ==========================
batch norm     ``(N, C, spatial)``     channel
instance norm  ``(1, N*C, spatial)``   (sample, channel)
layer norm     ``(1, rows, row)``      row
group norm     ``(1, N*G, C/G*sp)``    (sample, group)
=============  =====================  ==========================

Numerics. Statistics accumulate in float32 (float64 for float64 input), as a *corrected
two-pass* computation fused into one pass over memory: each group gets a provisional centre
``m0``, then the sums of ``d = x - m0`` and ``d * d`` give the correction ``c = mean(d)`` and the
variance ``mean(d*d) - c*c``. The subtraction loses nothing unless ``c*c`` is large next to
``mean(d*d)``, i.e. unless ``m0`` is many standard deviations from the mean, so ``m0`` is chosen
to keep ``|c|`` within ``_ZERO_CENTER_LIMIT`` standard deviations, and that is checked on the
final sums (at most 1 bit lost, of float32's 24): never the unchecked ``E[x^2] - E[x]^2``.

- ``m0 = 0`` where the data's own mean is that close to 0 (the usual case for activations):
  the blocks are then summed as they are, with no centred copy written.
- Otherwise ``m0`` is a mean of the data (of a first block of it; after a failed check, the
  mean just found). ``d`` is exact in floating point when ``x`` is near ``m0`` (Sterbenz), so a
  float32 input with mean 1e4 and std 1e-2 keeps all its significant bits. For a constant group
  ``d`` is one repeated value, every sum is exact, and the variance is exactly 0.

Large groups. One float32 sum over millions of elements drifts (a BLAS dot product: 1e-6
relative error at 1M elements, 8e-6 at 4M), and a centre taken from it can miss a far-off mean by
hundreds of standard deviations. So rows longer than ``_SEGMENT_ELEMENTS`` (256K) are cut into
segments, each with its own centre and short sums, combined in float64 (Chan et al.: the
segments' variances plus the spread of their means); where a block's centre still missed its
data's mean by more than a standard deviation, its groups are summed once more around the mean
found. Partial sums are added in float64 where more than ``_WIDE_COMBINE_ROWS`` meet. Squares of
centred data more than ``_COARSE_RATIO`` standard deviations from 0 are summed pairwise
(``sum``), not by dot products: such data are coarsely quantized, their squares' low bits far
from uniform, and a dot product's long float32 runs then round one way. Reductions go through :mod:`._dispatch` where a framework's
own function is the accurate one (torch: cascade sums, not its matrix-vector products).

The normalize step computes ``(x - m0) * scale + shift`` with ``shift = bias - c * scale``:
subtracting the centre first keeps large-mean inputs exact. Where ``|m0 * scale|`` is small
everywhere the centre is folded into the shift, ``x * scale + (shift - m0 * scale)``, one
operation fewer at a rounding cost below 1e-6.

Speed. The statistics and the normalize step work on blocks of about 256K elements (1 MiB of
float32, cache-sized), so a block's second operation finds it in cache; per-group sums are
matrix-vector products with a ones vector (BLAS, each call small enough to stay on one thread),
sums of squares dot products (NumPy's ``einsum`` on ``(N, C)``: no squared copy). Batch norm on
``(N, C)`` lays rows side by side (a working view ``(N / k, k * C)``) so NumPy's inner loops run
over thousands of elements instead of restarting every ``C``. Small operations between the
passes are kept few: after a pass over 8 MiB each one costs several times its usual few
microseconds (the caches hold the data, not the interpreter). Outputs and scratch blocks start
on a cache line. From 2M elements the calling thread and a small pool (NumPy and torch release
the GIL inside their kernels) take larger blocks from one queue, each worked through in
cache-sized pieces; per-block results are combined in block order, so results do not depend on
thread timing. Every hand-over between threads costs a wake-up (20-50 us on a virtual machine)
and Python run while another thread wants the GIL delays it: the pool hands work over with one
queue operation each way, and each piece costs few Python calls.
"""
from __future__ import annotations

import contextvars
import functools
import math
import os
import queue as _queue
import threading
from dataclasses import dataclass
from typing import NamedTuple

import array_api_compat

from . import _dispatch

# Elements per block (1 MiB of float32): small enough that a block's temporaries stay in L2,
# large enough that Python's per-operation overhead is small.
_BLOCK_ELEMENTS = 1 << 18
# From this many elements (8 MiB of float32) the thread pool pays: on 2 vCPUs, (4096, 512) took
# 0.8 + 0.9 ms on two threads against 1.3 + 1.3 ms on one (normalize + statistics); at 1.2M
# elements, (8, 3, 224, 224), waking the pool's thread cost about what it saved.
_PARALLEL_MIN_ELEMENTS = 1 << 21
# Blocks per thread when the pool shares the work (see _block_elements), and the largest block
# (8 MiB of float32).
_BLOCKS_PER_WORKER = 4
_THREADED_BLOCK_MAX = 1 << 21
# Largest matrix-vector product handed to BLAS in one call (OpenBLAS stays on one thread below it).
_BLAS_MAX_ELEMENTS = 1 << 18
# Batch norm on (N, C) lays rows side by side up to this many elements per row of its working view
# for the normalize step, and up to _STATS_ROW_ELEMENTS for the statistics: on (4096, 512) NumPy's
# elementwise loops ran fastest on 8192-element rows, the matrix-vector sums and einsum on rows
# of 512-2048 (their per-row accumulators then stay in L1; 5% of the whole call, measured).
_ROW_ELEMENTS = 8192
_STATS_ROW_ELEMENTS = 2048
# It lays rows side by side only from this many elements: below, the repeated per-channel vectors
# and the folding cost more than NumPy's loop restarts save ((32, 64): 84 us per training call side
# by side, 70 us as it is; (2048, 64): 143 against 168 us).
_TILE_MIN_ELEMENTS = 1 << 16
# Rows shorter than this are reduced with an elementwise square rather than a dot product.
_VECDOT_MIN_LENGTH = 32
# moments sums around centre 0 (no centred copy of the data) when every group's |mean| is at most
# this many standard deviations: cancellation then costs the variance at most log2(1 + limit**2)
# = 1 bit, against the ~24 of float32 accumulation.
_ZERO_CENTER_LIMIT = 1.0
# Longest run of a row that one float32 sum covers (see _segmented_moments): up to 256K
# elements NumPy's BLAS sums and dot products, torch's cascade sums and NumPy's vecdot stay within
# 2e-7 relative error (measured), against 1e-6 at 1M elements and 8e-6 at 4M.
_SEGMENT_ELEMENTS = 1 << 18
# Partial sums are added in float64 where more than this many of them meet (the rows of per-block
# results, side-by-side tiles): one float32 BLAS chain over thousands of partials drifts (batch
# norm on (1M, 4): 4096 partials per channel, up to 1.3e-6 relative error in the variance; 7e-8
# in float64, measured). Up to here the chain costs nothing measurable and the float32 product runs.
_WIDE_COMBINE_ROWS = 64
# normalize folds the centre into the shift when |center * scale| stays below this everywhere:
# the folded form's rounding error is then below 1e-6 of the output's scale.
_FOLD_LIMIT = 4.0

# Threads of the block pool: the CPUs this process may run on, at most 8.
_WORKERS = max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))

class _Pool:
    """``n`` daemon threads running the functions handed to :meth:`start`, one at a time each.

    Leaner than ``concurrent.futures.ThreadPoolExecutor`` at the hand-overs, where it counts: a
    function's end is one ``put`` on the caller's queue, after which the thread blocks at once,
    so the caller wakes to a free GIL. (A future's thread runs Python after waking the caller,
    who then sleeps once more for the GIL: about 50 us per call of :func:`_map_blocks` on a
    2-vCPU virtual machine, measured.)
    """

    def __init__(self, n: int):
        self._tasks = _queue.SimpleQueue()
        self.threads = [threading.Thread(target=self._serve, name=f"cupybn-{i}", daemon=True) for i in range(n)]
        for t in self.threads:
            t.start()

    def close(self) -> None:
        """End the threads once the work already handed over is done, and wait for them."""
        for _ in self.threads:
            self._tasks.put(None)
        for t in self.threads:
            t.join()

    def _serve(self):
        while True:
            task = self._tasks.get()
            if task is None:
                return
            fn, done = task
            try:
                fn()
            except BaseException as exc:  # the caller raises it
                done.put(exc)
            else:
                done.put(None)

    def start(self, fn, done) -> None:
        """Run ``fn()`` on a pool thread; its end (None or the exception) is put on ``done``."""
        self._tasks.put((fn, done))


_pool = None


def _workers() -> _Pool:
    global _pool
    if _pool is None:
        _pool = _Pool(max(1, _WORKERS - 1))
    return _pool


def _forget_pool():
    """In a forked child (a DataLoader worker, say) the parent's pool threads do not exist, and
    work queued for them would wait forever: start a new pool on first use instead."""
    global _pool
    _pool = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


_local = threading.local()


def _cached(key, make):
    """A per-thread array cached under ``key`` (made by ``make()`` on first use).

    Few shapes occur per call (the block and piece shapes); the cache is emptied when it grows
    past a handful of entries, so it never holds more than a few blocks of memory.
    """
    cache = _local.__dict__.setdefault("cache", {})
    arr = cache.get(key)
    if arr is None:
        if len(cache) >= 16:
            cache.clear()
        arr = cache[key] = make()
    return arr


def _scratch(xp, shape, dtype, like):
    """A per-thread work array of ``shape`` (contents undefined), reused across blocks and calls.

    Reusing it keeps a block's temporaries in cache and spares the page faults of fresh memory.
    """
    # the namespace comes first in the key, so dtypes of different frameworks are never compared
    return _cached(("scratch", xp.__name__, dtype, tuple(shape)),
                   lambda: _dispatch.empty_aligned(xp, tuple(shape), dtype, like, reusable=True))


_ONES: dict = {}


def _ones(xp, n, dtype, like):
    """A vector of ``n`` ones for the matrix-vector group sums, shared by all threads (read only).

    One dictionary lookup: it is asked for once per cache-sized piece.
    """
    # the namespace comes first in the key, so dtypes of different frameworks are never compared
    key = (xp.__name__, dtype, n)
    ones = _ONES.get(key)
    if ones is None:
        if len(_ONES) >= 64:
            _ONES.clear()
        ones = _ONES[key] = xp.ones((n,), dtype=dtype, device=array_api_compat.device(like))
    return ones


def accumulation_dtype(xp, dtype):
    """float64 for float64 data, float32 for every narrower float (f16, bf16, f32)."""
    return xp.float64 if dtype == xp.float64 else xp.float32


@dataclass
class Moments:
    """Per-group statistics of a ``(A, C, L)`` view; arrays of shape ``(C,)`` in the accumulation dtype.

    ``mean = center + offset``; keeping the two apart lets the normalize step subtract the exact
    ``center`` first. ``var`` is the biased variance (divisor ``count``).
    """

    center: object
    offset: object
    var: object
    count: int
    #: False when every group's centre is 0 (the sums were taken around 0): ``offset`` is the mean.
    centred: bool = True

    @functools.cached_property
    def mean(self):
        if not self.centred:
            return self.offset
        xp = _dispatch.namespace(self.center)
        # With Inf in a group the centre is +-Inf and the correction NaN; the mean is the centre then.
        return xp.where(xp.isfinite(self.center), self.center + self.offset, self.center)


def _blocks(shape, block_elements: int | None = None):
    """Slices ``(a0, a1, c0, c1)`` that tile a ``(A, C, L)`` array in blocks of ~``block_elements``
    (default ``_BLOCK_ELEMENTS``).

    A block holds whole rows of axis 2: several entries of axis 0 when one ``(C, L)`` slice is
    small, else one entry of axis 0 and as many groups of axis 1 as fit.
    """
    size = block_elements or _BLOCK_ELEMENTS
    a, c, l = shape
    c_step = max(1, size // max(1, l))
    a_step = max(1, size // max(1, c * l)) if c_step >= c else 1
    return [(i, min(a, i + a_step), j, min(c, j + c_step))
            for i in range(0, a, a_step) for j in range(0, c, c_step)]


def _threaded(elements: int) -> bool:
    """Whether an array of ``elements`` elements is worth the thread pool."""
    return _WORKERS > 1 and elements >= _PARALLEL_MIN_ELEMENTS


def _block_elements(elements: int) -> int:
    """Block size for an array of ``elements`` elements.

    Alone, a thread works through cache-sized blocks. Sharing the work, threads take larger
    blocks (about ``_BLOCKS_PER_WORKER`` each): every NumPy call ends by taking the GIL back, and
    on a virtual machine a thread woken for it can lose the race to the other thread's next call
    for milliseconds, so fewer, longer calls keep both threads running (measured on 2 vCPUs,
    (4096, 512): about 2.3 ms in 1 MiB blocks on one or two threads, 1.5 ms in 1M-element blocks
    split into cache-sized pieces on two).
    """
    if not _threaded(elements):
        return _BLOCK_ELEMENTS
    return max(_BLOCK_ELEMENTS, min(_THREADED_BLOCK_MAX, -(-elements // (_WORKERS * _BLOCKS_PER_WORKER))))


def _map_blocks(fn, blocks, elements: int):
    """``[fn(block) for block in blocks]``, shared with the thread pool when the array (of
    ``elements`` elements) is large.

    The calling thread and the pool's threads take the next block from one queue until none is
    left, so a thread that starts late (a pool thread may first have to be woken, tens of
    microseconds on a virtual machine) simply takes fewer blocks; results are stored by block
    index, so they come back in block order whatever the timing. Pool tasks run in a copy of the
    caller's context, so settings such as NumPy's ``errstate`` apply in the pool's threads too.
    Each call waits on a queue of its own for its tasks' ends, so calls from several threads can
    share the pool.
    """
    workers = min(len(blocks), _WORKERS) if _threaded(elements) else 1
    if workers <= 1:
        return [fn(b) for b in blocks]
    results = [None] * len(blocks)
    queue = iter(enumerate(blocks))  # next() on it is atomic: it runs in C, under the GIL

    def work():
        for i, bounds in queue:
            results[i] = fn(bounds)

    done, pool = _queue.SimpleQueue(), _workers()
    for _ in range(workers - 1):  # (a context is entered by one thread at a time: one copy each)
        pool.start(functools.partial(contextvars.copy_context().run, work), done)
    try:
        work()
    finally:
        for _ in queue:  # after an error: the pool's threads finish their current block
            pass
        errors = [done.get() for _ in range(workers - 1)]
    for error in errors:
        if error is not None:
            raise error
    return results


def _row_tiles(a: int, c: int, row_elements: int) -> int:
    """How many rows of an ``(a, c)`` array to lay side by side as one row of the working view:
    the largest divisor of ``a`` that keeps a view row within ``row_elements``."""
    for k in range(max(1, min(a, row_elements // max(1, c))), 0, -1):
        if a % k == 0:
            return k
    return 1


def _settings():
    """The module settings a layout depends on (read at each call: tests change them)."""
    return (_BLOCK_ELEMENTS, _PARALLEL_MIN_ELEMENTS, _THREADED_BLOCK_MAX, _BLOCKS_PER_WORKER, _WORKERS,
            _TILE_MIN_ELEMENTS)


class _Layout(NamedTuple):
    """How :class:`_Grouped` tiles a ``(A, C, L)`` shape (see :func:`_layout`)."""

    flat: bool  # L == 1: the working view drops its last axis
    tiles: int  # rows laid side by side in the working view
    grid: tuple  # the working view's shape
    blocks: tuple  # block bounds (a0, a1, c0, c1) in the working view
    index: dict  # bounds -> position in blocks
    row_blocks: bool  # every block spans the whole width


@functools.lru_cache(maxsize=64)
def _layout(shape, row_elements: int, settings) -> _Layout:
    """The :class:`_Layout` of a ``(A, C, L)`` shape: worked out once per shape, since a training
    loop sees the same few shapes call after call. ``settings`` (see :func:`_settings`) only keys
    the cache."""
    a, c, l = shape
    flat = l == 1
    tiles = _row_tiles(a, c, row_elements) if flat and a * c >= _TILE_MIN_ELEMENTS else 1
    grid = (a // tiles, c * tiles, l)
    blocks = tuple(_blocks(grid, _block_elements(math.prod(grid))))
    return _Layout(flat, tiles, grid, blocks, {b: i for i, b in enumerate(blocks)},
                   all(c0 == 0 and c1 == grid[1] for _, _, c0, c1 in blocks))


def _added(totals, sums):
    """``totals + sums`` elementwise over two tuples of arrays (``sums`` when ``totals`` is None)."""
    return sums if totals is None else tuple(t + s for t, s in zip(totals, sums))


class _Grouped:
    """A ``(A, C, L)`` view with the block helpers both passes and the normalize step share.

    With ``L == 1`` (batch norm on ``(N, C)``) the view drops its last axis: broadcasting a
    ``(C, 1)`` vector over a trailing axis of length 1 makes NumPy loop one element at a time.
    It also lays ``tiles`` consecutive rows side by side, ``(A / tiles, tiles * C)`` with rows of
    at most ``row_elements``, with every per-channel vector repeated ``tiles`` times to match:
    NumPy's loops restart at every row of a broadcast operation, and rows of a few hundred
    channels made that restart cost a third of the normalize step. Block bounds and per-group
    results of the helpers refer to this working view, ``grid``; :meth:`fold` and :meth:`tile`
    convert per-group vectors.
    """

    def __init__(self, x3, row_elements: int):
        self.xp = _dispatch.namespace(x3)
        self.shape = tuple(x3.shape)
        self.layout = _layout(self.shape, row_elements, _settings())
        self.flat, self.tiles, self.grid, self.blocks = self.layout[:4]
        self.x = self.xp.reshape(x3, self.grid[:2]) if self.flat else x3
        self.acc = accumulation_dtype(self.xp, x3.dtype)
        self.in_acc = x3.dtype == self.acc

    def map(self, fn):
        """``[fn(bounds) for bounds in self.blocks]``, on the thread pool when the array is large."""
        return _map_blocks(fn, self.blocks, math.prod(self.grid))

    def fold(self, v):
        """Per-group sums of the working view, ``(tiles * C,)``, folded to the ``(C,)`` groups."""
        if self.tiles == 1:
            return v
        return _sum_partials(self.xp, self.xp.reshape(v, (self.tiles, self.shape[1])))

    def tile(self, v):
        """A per-group vector ``(C,)`` repeated for the working view's ``tiles * C`` columns."""
        return v if self.tiles == 1 else self.xp.tile(v, (self.tiles,))

    def block(self, bounds):
        """The block of x at ``bounds`` in the accumulation dtype (a view when x has that dtype)."""
        a0, a1, c0, c1 = bounds
        b = self.x[a0:a1, c0:c1, ...]
        return b if self.in_acc else self.xp.astype(b, self.acc)

    def pieces(self, bounds):
        """``bounds`` split along axis 0 into pieces of about ``_BLOCK_ELEMENTS`` elements."""
        a0, a1, c0, c1 = bounds
        rows = max(1, _BLOCK_ELEMENTS // ((c1 - c0) * self.grid[2]))
        if rows >= a1 - a0:
            return [bounds]
        return [(i, min(a1, i + rows), c0, c1) for i in range(a0, a1, rows)]

    def block_shape(self, bounds):
        """Shape of the block at ``bounds``."""
        a0, a1, c0, c1 = bounds
        return (a1 - a0, c1 - c0) if self.flat else (a1 - a0, c1 - c0, self.grid[2])

    def per_group(self, vec):
        """A per-group vector of the working view shaped to broadcast against its blocks."""
        return vec if self.flat else vec[:, None]

    def group_sums(self, d):
        """Per-group sums of a block ``d`` (shape of :meth:`block`): a matrix-vector product with
        ones, which runs in BLAS at several times the speed of ``sum`` over these axes."""
        xp = self.xp
        if self.flat:
            # d is a piece (see pieces): at most _BLOCK_ELEMENTS <= _BLAS_MAX_ELEMENTS elements
            # unless one row holds more, so OpenBLAS keeps the call on this thread.
            return _dispatch.sum_with_ones(xp, d, _ones(xp, d.shape[0], d.dtype, d), -2)
        return xp.sum(_dispatch.sum_with_ones(xp, d, _ones(xp, d.shape[2], d.dtype, d), -1), axis=0)

    def group_sums_of_squares(self, d, overwrite: bool = False, pairwise: bool = False):
        """Per-group sums of ``d * d``; overwrites ``d`` only when ``overwrite``, else squares into
        the thread's scratch block. ``pairwise`` (with ``overwrite``): squares summed pairwise."""
        xp = self.xp
        if not self.flat and overwrite and pairwise:
            # Centred data far from 0 are coarsely quantized (1e3 +- 1e-2: steps of 0.006 std),
            # and the low bits of their squares are far from uniform: a dot product's long float32
            # runs then round one way (2e-5 relative error at 256K elements, measured), where a
            # pairwise sum of the squares stays at 5e-8. (It costs a pass: LayerNorm (8, 4096,
            # 1024) at 3 +- 1 took 155 ms this way, 129 ms with the dot product.)
            _dispatch.binary_into(xp.multiply, d, d, d)
            return xp.sum(xp.sum(d, axis=-1), axis=0)
        if not self.flat and d.shape[2] >= _VECDOT_MIN_LENGTH:
            return xp.sum(_dispatch.sum_of_squares(xp, d), axis=0)
        if self.flat:
            fused = _dispatch.column_sums_of_squares(d)
            if fused is not None:
                return fused
        t = d if overwrite else _scratch(xp, tuple(d.shape), d.dtype, d)
        _dispatch.binary_into(xp.multiply, d, d, t)
        return self.group_sums(t)

    def raw_sums(self, bounds):
        """``(sum(x), sum(x * x))`` per group of the block at ``bounds``: the sums around centre 0,
        taken without writing a centred copy of the block (in cache-sized pieces)."""
        totals = None
        for piece in self.pieces(bounds):
            x = self.block(piece)
            totals = _added(totals, (self.group_sums(x), self.group_sums_of_squares(x)))
        return totals

    def centred_sums(self, bounds, center, pairwise: bool = True):
        """``(sum(d), sum(d * d))`` per group of the block at ``bounds``, ``d = x - center`` with
        ``center`` the block's own groups' centres (shape ``(c1-c0,)``). ``pairwise``: the data
        may be coarsely quantized (see :func:`_coarse`), sum the squares pairwise."""
        xp = self.xp
        center = center if self.flat else center[:, None]

        totals = None
        for piece in self.pieces(bounds):
            d = _scratch(xp, self.block_shape(piece), self.acc, self.x)
            _dispatch.binary_into(xp.subtract, self.block(piece), center, d)
            totals = _added(totals, (self.group_sums(d),
                                     self.group_sums_of_squares(d, overwrite=True, pairwise=pairwise)))
        return totals

    def sums(self, fn, combine=(True, True)):
        """Per-group results of ``fn(bounds) -> tuple of (c1-c0,) arrays`` over all blocks, folded
        to the ``(C,)`` groups (see :meth:`fold`); None when ``fn`` returned None for a block (it
        does so to stop a pass early).

        ``combine[i]`` says whether result ``i`` is a sum over blocks or the same value from
        every block (one entry per result). Sums are added in block order, so they do not depend
        on thread timing.
        """
        xp = self.xp
        nb, width, k = len(self.blocks), self.grid[1], len(combine)
        if nb == 1:  # nothing to combine (most small inputs)
            results = fn(self.blocks[0])
            return None if results is None else [self.fold(r) if add else r for r, add in zip(results, combine)]
        if all(combine) and self.layout.row_blocks and k * nb * width <= _BLAS_MAX_ELEMENTS:
            # Row blocks: every result covers every group. Each block stores its results in its
            # own row of one small array (in the thread that made them), and one matrix-vector
            # product adds them over the blocks and the side-by-side rows: few small operations
            # after the pool is done (each costs more there, with the caches full of data).
            store = _scratch(xp, (k, nb, width), self.acc, self.x)  # every row is written
            index = self.layout.index

            def stored(bounds):
                results = fn(bounds)
                if results is None:
                    return False
                i = index[bounds]
                for j, r in enumerate(results):
                    store[j, i, ...] = r
                return True

            if not all(self.map(stored)):
                return None
            total = _sum_partials(xp, xp.reshape(store, (k, nb * self.tiles, self.shape[1])))
            return [total[j, ...] for j in range(k)]
        per_block = self.map(fn)
        if any(r is None for r in per_block):
            return None
        totals = [xp.zeros((width,), dtype=self.acc) for _ in combine]
        for (_, _, c0, c1), results in zip(self.blocks, per_block):
            for total, add, r in zip(totals, combine, results):
                total[c0:c1] = total[c0:c1] + r if add else r
        return [self.fold(t) if add else t for t, add in zip(totals, combine)]


def _sum_partials(xp, parts):
    """``parts`` (float32 or float64 partial sums) added over axis -2, in their dtype: in float64
    where more than ``_WIDE_COMBINE_ROWS`` meet (see there), else a matrix-vector product."""
    rows, dtype = parts.shape[-2], parts.dtype
    if rows > _WIDE_COMBINE_ROWS and dtype != xp.float64:
        return xp.astype(xp.sum(xp.astype(parts, xp.float64), axis=-2), dtype)
    return _dispatch.sum_with_ones(xp, parts, _ones(xp, rows, dtype, parts), -2)


def _mean_var(sum1, sum2, count, zeros):
    """Mean and biased variance (clipped at 0: rounding can leave it a few ulps below) from the
    sums of ``d`` and ``d * d`` around a centre; the mean is relative to that centre."""
    xp = _dispatch.namespace(sum1)
    mean = sum1 / count
    return mean, xp.maximum(sum2 / count - mean * mean, zeros)


def _around_zero(sum1, sum2, count):
    """``(mean, var)`` from the sums around 0 of ``count`` elements per group, or None where they
    are not accurate: unless ``|mean| <= _ZERO_CENTER_LIMIT * std`` in every group (None where any
    group holds NaN, so non-finite data takes the centred path).

    Where the test passes the variance is non-negative as it stands (``var >= mean**2``): no
    clipping, two operations fewer than :func:`_mean_var` and a separate test.
    """
    xp = _dispatch.namespace(sum1)
    mean = sum1 / count
    square = mean * mean
    var = sum2 / count - square
    bound = var if _ZERO_CENTER_LIMIT == 1 else (_ZERO_CENTER_LIMIT ** 2) * var
    return (mean, var) if bool(xp.all(square <= bound)) else None


def _near_zero(sum1, sum2, count) -> bool:
    """A quick guess whether sums around 0 will serve: :func:`_around_zero`'s test for the groups
    of a first block *taken together*, from their sums around 0 over ``count`` elements each.

    The groups' mean squared mean at most ``_ZERO_CENTER_LIMIT**2`` times their mean variance is
    ``(1 + limit**2) * sum(sum1**2) <= limit**2 * count * sum(sum2)``: two reductions and a
    comparison of Python floats, where a test per group would take half a dozen operations in the
    thread that is summing (each slow with the caches full of data). It holds whenever every group
    passes, so data near 0 never stops early; the test per group on the final totals decides.
    False where the sums hold NaN.
    """
    xp = _dispatch.namespace(sum1)
    k = _ZERO_CENTER_LIMIT ** 2
    return (1 + k) * float(_dispatch.sum_of_squares(xp, sum1)) <= (k * count) * float(xp.sum(sum2))


# Data whose mean lies more than this many standard deviations from 0 are coarsely quantized
# next to their spread (float32 steps of at least 64 * 2^-24 = 4e-6 standard deviations): their
# centred squares are summed pairwise (see _Grouped.group_sums_of_squares). Below it the steps
# are too fine to bias a dot product's rounding, and the faster dot product runs.
_COARSE_RATIO = 64.0


def _coarse(mean, sum2, count) -> bool:
    """Whether any group's ``|mean|`` exceeds ``_COARSE_RATIO`` standard deviations, from its
    sum of squares around 0. That variance loses ~1e-6 of ``mean**2`` to cancellation, far below
    the ``mean**2 / _COARSE_RATIO**2`` it is compared with, so the answer is sure away from
    the boundary, and near it either answer is accurate. True where the sums hold NaN."""
    xp = _dispatch.namespace(mean)
    square = mean * mean
    var = sum2 / count - square
    return not bool(xp.all(square * (1.0 / _COARSE_RATIO ** 2) < var))


def _centre_far_off(offset, var) -> bool:
    """Whether a finite group's mean lies more than ``_ZERO_CENTER_LIMIT`` standard deviations
    from the centre it was summed around (groups holding NaN or Inf are left as they are)."""
    xp = _dispatch.namespace(offset)
    far = offset * offset > (_ZERO_CENTER_LIMIT ** 2) * var
    return bool(xp.any(far & xp.isfinite(offset) & xp.isfinite(var)))


def moments(x3) -> Moments:
    """Mean and biased variance over axes 0 and 2 of ``x3`` (shape ``(A, C, L)``, ``A*L > 0``).

    Rows longer than ``_SEGMENT_ELEMENTS`` are cut into segments (see :func:`_segmented_moments`);
    otherwise see :func:`_block_moments`.
    """
    if x3.shape[2] > _SEGMENT_ELEMENTS:
        return _segmented_moments(x3)
    return _block_moments(x3)


def _segmented_moments(x3) -> Moments:
    """:func:`moments` of a view whose rows are longer than ``_SEGMENT_ELEMENTS``.

    A float32 sum over one long row loses accuracy with its length (BLAS: relative error 1e-6 at
    1M elements, 8e-6 at 4M), and a group's centre taken from such a sum can miss its mean by
    hundreds of standard deviations (1e4 +- 1e-2 over 4M elements: the variance came out 10x too
    large). So each segment ``x3[:, :, i:i+step]`` of at most ``_SEGMENT_ELEMENTS`` per row gets
    its own moments (around its own centre, every sum short), and the segments are combined in
    float64 (Chan et al.: the segments' variances plus the spread of their means around the
    overall mean), which is exact next to float32 however many segments there are. Segments too
    small to use the thread pool themselves share it.
    """
    xp = _dispatch.namespace(x3)
    a, c, l = x3.shape
    k = -(-l // _SEGMENT_ELEMENTS)
    step = -(-l // k)
    total = a * c * l
    pooled = a * c * step < _PARALLEL_MIN_ELEMENTS  # (else each segment's own pass uses the pool)
    parts = _map_blocks(lambda i: _block_moments(x3[:, :, i:i + step]), list(range(0, l, step)),
                        total if pooled else 0)

    wide, acc = xp.float64, accumulation_dtype(xp, x3.dtype)
    counts = xp.asarray([float(p.count) for p in parts], dtype=wide, device=array_api_compat.device(x3))[:, None]
    means = xp.stack([_wide_mean(p, wide) for p in parts])  # (segments, C)
    variances = xp.stack([xp.astype(p.var, wide) for p in parts])
    count = a * l
    mean = xp.sum(counts * means, axis=0) / count
    spread = means - mean
    var = xp.sum(counts * (variances + spread * spread), axis=0) / count
    # float32 centre plus the float64 mean's remainder: the normalize step subtracts the centre
    # exactly, then the remainder (Inf in a group: the centre is the mean, see Moments.mean)
    center = xp.astype(mean, acc)
    offset = xp.astype(mean - xp.astype(center, wide), acc)
    return Moments(center=center, offset=offset, var=xp.astype(var, acc), count=count)


def _wide_mean(m: Moments, wide):
    """``m.mean`` computed in the dtype ``wide``: ``center + offset`` rounded to float32 would
    lose the offset's low bits (1e4 +- 1e-2: a tenth of a standard deviation)."""
    xp = _dispatch.namespace(m.offset)
    offset = xp.astype(m.offset, wide)
    if not m.centred:
        return offset
    center = xp.astype(m.center, wide)
    return xp.where(xp.isfinite(center), center + offset, center)


def _block_moments(x3) -> Moments:
    """:func:`moments` of a view whose rows are at most ``_SEGMENT_ELEMENTS`` long.

    One pass over memory: each cache-sized block is summed around a provisional centre while it
    is still in cache. The centre is 0 (the block is summed as it is, without writing a centred
    copy) where that is accurate: where every group's mean lies within ``_ZERO_CENTER_LIMIT``
    standard deviations of 0, checked on the final sums. Elsewhere the centre is a mean of the
    data. With ``A == 1`` every block holds whole groups and decides on its own data; otherwise
    (batch norm) all blocks are summed around 0 while the blocks holding the first entries of axis
    0 check that this serves; where it does not, the pass stops early and is done around their
    mean. A pass whose totals fail the check is done again around the mean that pass found.
    """
    g = _Grouped(x3, _STATS_ROW_ELEMENTS)
    xp = g.xp
    a, c, l = g.shape
    count = a * l
    zeros = xp.zeros((c,), dtype=g.acc)

    if a == 1:  # every block holds whole groups (the working view is the view itself)
        centred = []  # appended to when a block is summed around its mean (list.append: atomic)

        def block_sums(bounds):
            n = l * (bounds[1] - bounds[0])
            s1, s2 = g.raw_sums(bounds)
            if _around_zero(s1, s2, n) is not None:
                return zeros[bounds[2]:bounds[3]], s1, s2
            centred.append(True)
            center = s1 / n
            return (center,) + g.centred_sums(bounds, center, pairwise=_coarse(center, s2, n))

        center, dsum, dsq = g.sums(block_sums, combine=(False, True, True))
        offset, var = _mean_var(dsum, dsq, count, zeros)
        if centred and _centre_far_off(offset, var):
            # A float32 sum of values far from 0 can miss their mean by many standard deviations
            # (1e6 +- 1 over 256K elements: by 30), and the variance then loses ~10 bits to
            # cancellation: once more around the mean just found (checked only where a block was
            # centred: data near 0 passed the test on its own sums).
            center = center + offset
            dsum, dsq = g.sums(lambda bounds: g.centred_sums(bounds, center[bounds[2]:bounds[3]]))
            offset, var = _mean_var(dsum, dsq, count, zeros)
        return Moments(center=center, offset=offset, var=var, count=count)

    # Every block is summed around 0, and the blocks holding the first rows check that this
    # serves for their groups. Where it does not, the blocks after them stop early (the pool's
    # threads may have summed one or two in vain) and the pass is done around the first rows' mean.
    width, head_rows = g.grid[1], g.blocks[0][1]
    far = []  # the first rows' sums, once a check failed (None: they cover only some groups)

    def block_sums(bounds):
        if far:
            return None
        sums = g.raw_sums(bounds)
        a0, a1, c0, c1 = bounds
        whole = c1 - c0 == width
        # (one block: the test on the totals decides at once; side-by-side rows fold only whole)
        if a0 == 0 and len(g.blocks) > 1 and (whole or g.tiles == 1):
            # the sum of squares over all groups needs no folding
            sum1 = g.fold(sums[0])
            if not _near_zero(sum1, sums[1], a1 * g.tiles * l):
                far.append(sum1 if whole else None)
                return None
        return sums

    totals = g.sums(block_sums)
    if far:
        sum1 = far[0] if far[0] is not None else g.fold(g.raw_sums((0, head_rows, 0, width))[0])
        center = sum1 / (head_rows * g.tiles * l)
    else:
        mean_var = _around_zero(totals[0], totals[1], count)
        if mean_var is not None:
            return Moments(center=zeros, offset=mean_var[0], var=mean_var[1], count=count, centred=False)
        # The first rows were not representative: sum again around the mean just found (within
        # float32 rounding of the true mean, which is all a centre needs).
        center = totals[0] / count
    for _ in range(2):
        tiled = g.tile(center)
        totals = g.sums(lambda bounds: g.centred_sums(bounds, tiled[bounds[2]:bounds[3]]))
        offset, var = _mean_var(totals[0], totals[1], count, zeros)
        if not _centre_far_off(offset, var):
            break
        # The first rows' mean was far from the data's: once more, around the mean just found.
        center = center + offset
    return Moments(center=center, offset=offset, var=var, count=count)


def inverse_std(var, eps, zero_for_zero_var: bool):
    """``1 / sqrt(var + eps)``; with ``zero_for_zero_var`` a group with var == 0 and eps == 0 gets 0.

    Batch-norm training uses the latter (ATen's ``invstd = 0`` when ``var == 0 and eps == 0``), so a
    constant channel normalizes to 0 (then ``bias``) instead of NaN.
    """
    xp = _dispatch.namespace(var)
    invstd = 1.0 / xp.sqrt(var + eps)
    if zero_for_zero_var and eps == 0:
        invstd = xp.where(var == 0, xp.zeros_like(invstd), invstd)
    return invstd


def normalize(x3, center, scale, shift, col_scale=None, col_shift=None, torch_eval=False):
    """``y = ((x - center) * scale + shift) * col_scale + col_shift`` over a ``(A, C, L)`` view.

    ``center`` (None for 0), ``scale``, ``shift`` have shape ``(C,)`` (one value per group of axis 1);
    ``col_scale`` / ``col_shift`` (layer norm's elementwise affine) have shape ``(L,)`` or are
    ``None``. Arithmetic runs in the accumulation dtype; the result has ``x3``'s dtype and shape.

    ``torch_eval`` (batch norm in eval): a group whose ``center * scale`` is not finite (a running
    variance of 0 with ``eps == 0`` makes ``scale`` infinite) is computed as torch's eval kernel
    computes every group, ``x * scale + (shift - center * scale)``: ``(x - center) * inf`` would
    give ``-inf, NaN, inf`` below, at and above the mean where torch gives NaN wherever
    ``x * inf`` meets a ``shift - center * inf`` of the other sign, or ``0 * inf``.
    """
    g = _Grouped(x3, _ROW_ELEMENTS)
    xp = g.xp
    y = _dispatch.empty_aligned(xp, g.x.shape, x3.dtype, x3)
    # x * scale + (shift - center * scale) saves a pass but rounds at the size of center * scale:
    # take it only when that is small, so large-mean inputs keep the exact subtraction.
    if center is not None:
        folded = center * scale
        if bool(xp.all(xp.abs(folded) <= _FOLD_LIMIT)):  # the usual case: one test, all folded
            shift = shift - folded
            center = None
        elif torch_eval:  # only where the test failed: fold the groups with a non-finite product
            odd = ~xp.isfinite(folded)
            if bool(xp.any(odd)):
                shift = xp.where(odd, shift - folded, shift)
                center = xp.where(odd, xp.zeros_like(center), center)  # x - 0 is x, exactly
    # per-group vectors shaped to broadcast against a block: (C,) on a flat view, else (C, 1)
    center, scale, shift = (None if v is None else g.per_group(g.tile(v)) for v in (center, scale, shift))

    def block(bounds):
        # A large block (the pool's) goes in cache-sized pieces, so that each piece's second
        # operation finds it in cache. (Few Python calls per piece: the other thread's NumPy
        # calls wait for the GIL while this one runs Python.)
        for piece in g.pieces(bounds):
            a0, a1, c0, c1 = piece
            out = y[a0:a1, c0:c1, ...]
            # Work in the output when it has the accumulation dtype, else in a scratch block.
            t = out if g.in_acc else _scratch(xp, out.shape, g.acc, x3)
            if center is None:
                _dispatch.binary_into(xp.multiply, g.block(piece), scale[c0:c1, ...], t)
            else:  # subtract first: exact for large means
                _dispatch.binary_into(xp.subtract, g.block(piece), center[c0:c1, ...], t)
                t *= scale[c0:c1, ...]
            t += shift[c0:c1, ...]
            if col_scale is not None:
                t *= col_scale
            if col_shift is not None:
                t += col_shift
            if t is not out:
                out[...] = xp.astype(t, x3.dtype)

    g.map(block)
    return xp.reshape(y, g.shape)


# ------------------------------------------------------------------------------------ backward
#
# The backward of every norm on the same ``(A, C, L)`` view as the forward. With
# ``xhat = (x - mean) * invstd`` per group and ``g`` the gradient that reaches ``xhat`` (``dy``,
# or ``dy`` times an affine weight that varies inside a group: layer norm's elementwise weight,
# group norm's per-channel weight), the gradient of the input is
#
#     dx = scale * (g - sum(g) / n - xhat * sum(g * xhat) / n)          (n = A * L per group)
#
# where ``scale`` is ``invstd`` times any per-group weight. Sums accumulate in float32 (float64
# for float64 input); arithmetic on whole arrays: the backward is a reference, not a fast path.

def grad_sums(g3, x3, mean, invstd):
    """Per-group ``(sum(g), sum(g * xhat))`` over axes 0 and 2 of two ``(A, C, L)`` arrays.

    ``xhat = (x - mean) * invstd`` with ``mean`` / ``invstd`` of shape ``(C,)``. Results have shape
    ``(C,)`` in the accumulation dtype of ``x3``.
    """
    xp = _dispatch.namespace(x3)
    acc = accumulation_dtype(xp, x3.dtype)
    g = xp.astype(g3, acc, copy=False)
    d = xp.astype(x3, acc) - mean[:, None]  # a fresh array: astype copies or subtract allocates
    d *= g
    sum_g = xp.sum(g, axis=(0, 2))
    sum_g_xmu = xp.sum(d, axis=(0, 2))
    return sum_g, sum_g_xmu * invstd


def normalize_backward(g3, x3, mean, invstd, scale, sum_g, sum_g_xhat, dtype):
    """``scale * (g - sum_g / n - xhat * sum_g_xhat / n)`` over a ``(A, C, L)`` view, as ``dtype``.

    ``mean``, ``invstd``, ``scale``, ``sum_g``, ``sum_g_xhat`` have shape ``(C,)`` (see
    :func:`grad_sums`); ``n = A * L``. Used by every training-mode backward.
    """
    xp = _dispatch.namespace(x3)
    acc = accumulation_dtype(xp, x3.dtype)
    a, _, l = x3.shape
    n = a * l
    g = xp.astype(g3, acc, copy=False)
    k = (sum_g_xhat / n) * invstd  # xhat * sum_g_xhat / n == (x - mean) * k
    t = xp.astype(x3, acc) - mean[:, None]
    t *= -k[:, None]
    t += g
    t -= (sum_g / n)[:, None]
    t *= scale[:, None]
    return xp.astype(t, dtype, copy=False)
