"""Background prefetching of training batches: the next batches load while the device trains.

:class:`Prefetcher` runs an iterator of batches (as ``adps.orchestration.train`` builds them from a
:class:`~adps.data.dataset.PreparedSliceDataset`) in a background thread, so reading HDF5 shards
and stacking slices overlaps the training step instead of adding to it. One thread is enough:
the training thread spends its time inside torch (waiting for the GPU, or in CPU kernels), which
releases the GIL.

Layer 1 of the platform (see ARCHITECTURE.md): no Ray, no MLflow.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

import torch

__all__ = ["Prefetcher"]

_DONE = object()  # the source is exhausted


def _pinned(item: Any, pin_memory: bool) -> Any:
    # Tensors already page-locked (PreparedSliceDataset.read_batch reads into such) are not copied.
    if pin_memory and isinstance(item, dict):
        return {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in item.items()}
    return item


def _put(out: queue.Queue, entry: tuple[Any, BaseException | None], stop: threading.Event) -> bool:
    """Queue ``entry`` unless asked to stop meanwhile; False when stopped."""
    while not stop.is_set():
        try:
            out.put(entry, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _produce(source: Iterator[Any], out: queue.Queue, stop: threading.Event, pin_memory: bool) -> None:
    """The thread: items of ``source`` into ``out``, then ``_DONE`` (with the source's exception, if any)."""
    try:
        for item in source:
            if not _put(out, (_pinned(item, pin_memory), None), stop):
                return
        _put(out, (_DONE, None), stop)
    except BaseException as error:  # noqa: BLE001 - handed to the consumer, raised there
        _put(out, (_DONE, error), stop)
    finally:
        close = getattr(source, "close", None)
        if close is not None:
            close()  # a generator source runs its own clean-up here, in the thread that ran it


class Prefetcher:
    """Iterate over ``source`` with up to ``depth`` items loaded ahead in a background thread.

    The items come out in the source's order. An exception of the source is raised, unchanged (a
    :class:`~adps.data.shards.ShardError` still names the file and slice), by :meth:`__next__`
    once the items before it are handed out. :meth:`close` (also on ``with`` exit) stops the
    thread and closes the source; call it before closing the dataset the source reads.
    ``depth = 0`` loads nothing ahead: the source is iterated in the caller's thread.

    Args:
        source: an iterator of batches: dicts of tensors, or anything else (handed out as is).
        depth: items kept ready (2); the thread loads one more while they wait, so up to
            ``depth + 2`` batches are in memory, the one being consumed included.
        pin_memory: copy every tensor of a dict item to page-locked memory in the thread, for an
            asynchronous ``.to("cuda", non_blocking=True)``. Needs CUDA.
    """

    def __init__(self, source: Iterator[Any], depth: int = 2, *, pin_memory: bool = False):
        self._stop = threading.Event()
        if depth < 0:
            raise ValueError(f"Prefetcher: depth must be >= 0, got {depth}")
        self._source = iter(source)
        self._pin_memory = pin_memory
        self._finished = False
        self._queue: queue.Queue[tuple[Any, BaseException | None]] = queue.Queue(maxsize=max(depth, 1))
        self._thread: threading.Thread | None = None
        if depth:
            # Started now, so the first batch loads while the caller sets up. The thread holds no
            # reference to this object, so an abandoned prefetcher is collected (__del__ stops it).
            self._thread = threading.Thread(target=_produce, name="adps-prefetch", daemon=True,
                                            args=(self._source, self._queue, self._stop, pin_memory))
            self._thread.start()

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self) -> Any:
        if self._finished:
            raise StopIteration
        if self._thread is None:
            try:
                return _pinned(next(self._source), self._pin_memory)
            except StopIteration:
                self._finished = True
                raise
        item, error = self._queue.get()
        if item is _DONE:
            self._finished = True
            self._join()
            if error is not None:
                raise error
            raise StopIteration
        return item

    def _join(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def close(self) -> None:
        """Stop loading ahead, wait for the thread and close the source. Idempotent."""
        self._finished = True
        self._stop.set()
        if self._thread is not None:
            self._join()
        else:
            close = getattr(self._source, "close", None)
            if close is not None:
                close()

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # An abandoned prefetcher must not leave its thread reading (it holds dataset handles).
        self._stop.set()
