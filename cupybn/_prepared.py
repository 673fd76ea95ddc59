"""Prepared calls: validate and plan once per call signature, then only bind and run.

Every public entry point computes a *signature* of its call -- the operation, the flags that
change the work (training, affine, running statistics present, output mask, ...) and, for each
array argument, its type, shape, strides, dtype and device (:func:`describe`) -- and looks it up
in one bounded, thread-safe LRU cache (:data:`cache`). The first call with a signature runs every
structural check and builds a *prepared call*: the chosen path, the namespace and, on the GPU,
the launch plans with their kernels resolved. Later calls with that signature check only what the
signature does not fix -- scalar values (``eps``, ``momentum``) and whether running statistics
are writable -- then allocate outputs, bind data pointers and launch.

A prepared call holds no data: only what the signature determines. A call that raises stores
nothing, and the checks that remain per call run before anything changes, so the "a failed call
changes nothing" contract holds on both the first and later calls.

Arrays of frameworks :func:`describe` does not know (DLPack producers, array-api-strict) are
not cached: their calls take the full path every time.

The cache holds ``CUPYBN_PREPARED_CALLS`` entries (default 512; 0 disables it).
"""
from __future__ import annotations

import collections
import os
import sys
import threading

#: describe()'s answer for an argument whose signature cannot be taken cheaply: the call is not cached
UNCACHED = object()


def _numpy_like(a):
    return (type(a), a.shape, a.strides, a.dtype)


def _cupy_like(a):
    return (type(a), a.shape, a.strides, a.dtype, a.device.id)


def _torch(a):
    return (type(a), a.shape, a.stride(), a.dtype, a.device)


def _none(a):
    return None


_DESCRIBERS: dict = {type(None): _none}


def _describer(kind):
    """The describe function of an array type (found once per type), or None."""
    cupy = sys.modules.get("cupy")
    torch = sys.modules.get("torch")
    numpy = sys.modules.get("numpy")
    fn = None
    if numpy is not None and kind is numpy.ndarray:
        fn = _numpy_like
    elif cupy is not None and isinstance(getattr(cupy, "ndarray", None), type) and issubclass(kind, cupy.ndarray):
        fn = _cupy_like
    elif torch is not None and issubclass(kind, torch.Tensor):
        fn = _torch
    elif numpy is not None and issubclass(kind, numpy.ndarray):
        fn = _numpy_like
    if fn is not None:
        _DESCRIBERS[kind] = fn
    return fn


def describe(a):
    """The part of an array argument's signature a prepared call depends on: ``(type, shape,
    strides, dtype[, device])``; None for None; :data:`UNCACHED` for anything else."""
    fn = _DESCRIBERS.get(type(a))
    if fn is None:
        fn = _describer(type(a))
        if fn is None:
            return UNCACHED
    return fn(a)


class PreparedCache:
    """A bounded LRU map from call signatures to prepared calls, safe to share between threads.

    Lookups take no lock (an ``OrderedDict`` read and ``move_to_end`` are atomic under the GIL,
    and a concurrent eviction only costs a re-preparation); insertions and evictions take one.
    ``hits`` / ``misses`` count lookups; ``plans`` counts launch plans made (GPU path).
    """

    def __init__(self, maxsize: int):
        self.maxsize = maxsize
        self._entries: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = self.plans = 0

    def get(self, key):
        """The prepared call stored under ``key``, or None."""
        try:
            call = self._entries[key]
        except KeyError:
            self.misses += 1
            return None
        except TypeError:  # an unhashable part (never cached)
            return None
        try:
            self._entries.move_to_end(key)
        except KeyError:  # evicted by another thread meanwhile: still valid for this call
            pass
        self.hits += 1
        return call

    def put(self, key, call):
        """Store ``call`` under ``key`` (evicting the least recently used) and return it."""
        if self.maxsize <= 0:
            return call
        with self._lock:
            self._entries[key] = call
            while len(self._entries) > self.maxsize:
                self._entries.popitem(last=False)
        return call

    def clear(self) -> None:
        """Forget every prepared call (and reset the counters)."""
        with self._lock:
            self._entries.clear()
            self.hits = self.misses = self.plans = 0

    def __len__(self) -> int:
        return len(self._entries)


cache = PreparedCache(int(os.environ.get("CUPYBN_PREPARED_CALLS", "512")))


def cached(key, prepare, *args):
    """The prepared call for ``key``: from the cache, else ``prepare(*args)`` (stored when the key
    holds no :data:`UNCACHED` part). ``prepare`` runs every structural check and may raise."""
    if UNCACHED in key:
        return prepare(*args)
    call = cache.get(key)
    if call is None:
        call = cache.put(key, prepare(*args))
    return call
