"""Chunked evaluation that backs off on out-of-memory errors.

The hot loops of vitxai (the perturbation engine and the gradient kernel) evaluate many model
inputs in chunks. :func:`run_chunked` calls ``fn(lo, hi)`` over [0, total) in chunks of
``batch_size``; when a chunk runs out of memory it frees the allocator's caches, halves the
chunk and retries the *same* rows, and keeps the smaller size for the rest of the call. Chunks
cover the rows in order whatever their size, so results only depend on the rows (and, for
floating-point kernels that are not batch invariant, on the chunk sizes actually used, which
:attr:`AdaptiveBatch.size` reports).

Which errors count as out of memory: ``torch.OutOfMemoryError`` (CUDA, MPS, XPU), Python's
``MemoryError``, and a ``RuntimeError`` whose message says "out of memory" or "can't allocate
memory" (the CPU allocator: "DefaultCPUAllocator: can't allocate memory: you tried to
allocate ...").
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import torch

T = TypeVar("T")
log = logging.getLogger(__name__)

_OOM_PHRASES = ("out of memory", "can't allocate memory", "cannot allocate memory")


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is an allocator's out-of-memory error (see the module docstring)."""
    if isinstance(error, torch.OutOfMemoryError | MemoryError):
        return True
    if isinstance(error, RuntimeError):
        message = str(error).lower()
        return any(p in message for p in _OOM_PHRASES)
    return False


def free_memory() -> None:
    """Collect garbage and return cached accelerator memory to the device."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    mps = getattr(torch, "mps", None)
    if mps is not None and torch.backends.mps.is_available():  # pragma: no cover - macOS only
        mps.empty_cache()


def default_batch_size(device: torch.device | str) -> int:
    """Rows per chunk when a method's ``batch_size`` is None: 16 on a CPU, 64 elsewhere.

    Measured (benchmarks/README.md): on a 2-core CPU, batch 16 was 1.05–1.47× faster per
    evaluation than 64 for LIME and 1.28–1.36× for Integrated Gradients, on the bundled ViT
    and DeiT-tiny (activations of 16 images stay in cache); accelerators need large batches
    to fill, and the out-of-memory back-off covers the rest.
    """
    return 16 if torch.device(device).type == "cpu" else 64


class AdaptiveBatch:
    """A batch size that halves on out-of-memory errors and remembers where it settled.

    Args:
        batch_size: the first chunk size to try (≥ 1).
        min_batch: the smallest chunk size worth trying (≥ 1); a chunk of this size (or a
            smaller last chunk) that still runs out of memory re-raises.
        what: how messages name the chunk items ("images", "path points", ...).

    Attributes:
        size: the chunk size in use; after a back-off, the size that worked.
        initial: the requested size.
        backoffs: how many times a chunk was retried smaller.

    Usage::

        batcher = AdaptiveBatch(64)
        outputs = batcher.run(lambda lo, hi: model(x[lo:hi]), len(x))
        print(batcher.size)  # 64, or the size it backed off to
    """

    def __init__(self, batch_size: int, *, min_batch: int = 1, what: str = "items") -> None:
        if batch_size < 1 or min_batch < 1:
            raise ValueError(f"batch_size ({batch_size}) and min_batch ({min_batch}) must be ≥ 1")
        self.initial = int(batch_size)
        self.size = int(batch_size)
        self.min_batch = int(min_batch)
        self.what = what
        self.backoffs = 0

    def run(self, fn: Callable[[int, int], T], total: int,
            consume: Callable[[int, int, T], Any] | None = None) -> list[T]:
        """Call ``fn(lo, hi)`` on consecutive chunks covering [0, total).

        Args:
            fn: evaluates rows [lo, hi); it is called again on a smaller range after an
                out-of-memory error, so it must not have side effects that a retry would
                repeat (put those in ``consume``).
            total: number of rows.
            consume: optional ``consume(lo, hi, value)`` called once per successful chunk,
                outside the retry; when given, values are not collected (memory stays bounded
                by one chunk) and the result is an empty list.

        Returns:
            The chunks' values in order (empty when ``consume`` is given).

        Raises:
            torch.OutOfMemoryError: a chunk of ``min_batch`` rows (or fewer) still ran out of
                memory; the message is one line, the original error is its ``__cause__``.
        """
        out: list[T] = []
        lo = 0
        while lo < total:
            hi = min(lo + self.size, total)
            try:
                value = fn(lo, hi)
            except (RuntimeError, MemoryError) as error:
                if not is_out_of_memory(error):
                    raise
                smaller = (hi - lo) // 2
                if smaller < self.min_batch:
                    first = str(error).strip().splitlines()[0][:200] if str(error) else ""
                    raise torch.OutOfMemoryError(
                        f"out of memory with {hi - lo} {self.what} per chunk (the smallest "
                        f"allowed is {self.min_batch}): {type(error).__name__}: {first}; "
                        f"use a smaller model, fewer images per batch or precision='bf16'"
                    ) from error
                retry_at = smaller
            else:
                if consume is None:
                    out.append(value)
                else:
                    consume(lo, hi, value)
                lo = hi
                continue
            # outside the except block, so the traceback's frames (and their tensors) are gone
            free_memory()
            log.warning("out of memory with %d %s per chunk; retrying with %d", hi - lo,
                        self.what, retry_at)
            self.size = retry_at
            self.backoffs += 1
        return out


def run_chunked(fn: Callable[[int, int], T], total: int, batch_size: int, *,
                min_batch: int = 1, consume: Callable[[int, int, T], Any] | None = None,
                batcher: AdaptiveBatch | None = None) -> list[T]:
    """``AdaptiveBatch(batch_size, min_batch=min_batch).run(fn, total, consume)``.

    Pass ``batcher`` (then ``batch_size`` and ``min_batch`` are ignored) to read the size it
    settled on afterwards (:attr:`AdaptiveBatch.size`) or to carry it over to a later call.
    """
    b = batcher if batcher is not None else AdaptiveBatch(batch_size, min_batch=min_batch)
    return b.run(fn, total, consume)
