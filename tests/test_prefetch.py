"""The background batch prefetcher: order, errors, early stop, and loading ahead."""

from __future__ import annotations

import gc
import threading
import time

import pytest
import torch

from adps.data.prefetch import Prefetcher


def numbered_batches(n: int, log: list[str] | None = None, fail_at: int | None = None):
    """``n`` dict batches; records what it did in ``log``; raises at item ``fail_at``."""
    try:
        for i in range(n):
            if i == fail_at:
                raise ValueError(f"shard train-000.h5: slice id {i}: broken")
            if log is not None:
                log.append(f"load {i}")
            yield {"x": torch.full((2, 3), float(i)), "slice_id": torch.tensor([i, i])}
    finally:
        if log is not None:
            log.append("closed")


def live_prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "adps-prefetch"]


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_items_come_out_in_order_and_the_thread_ends(depth: int) -> None:
    with Prefetcher(numbered_batches(7), depth) as batches:
        got = [int(b["x"][0, 0]) for b in batches]
        assert next(batches, None) is None  # exhausted stays exhausted
    assert got == list(range(7))
    assert not live_prefetch_threads()


@pytest.mark.parametrize("depth", [0, 2])
def test_a_source_error_comes_after_the_items_before_it_unchanged(depth: int) -> None:
    got = []
    with pytest.raises(ValueError, match=r"shard train-000.h5: slice id 3: broken"):
        with Prefetcher(numbered_batches(7, fail_at=3), depth) as batches:
            for batch in batches:
                got.append(int(batch["x"][0, 0]))
    assert got == [0, 1, 2]
    assert not live_prefetch_threads()


def test_loads_ahead_while_the_consumer_holds_a_batch() -> None:
    """While the consumer still holds batch 0, the thread loads batches 1 to 3 (two wait in the
    queue, one waits for room) and goes no further."""
    log: list[str] = []
    with Prefetcher(numbered_batches(10, log), depth=2) as batches:
        first = next(batches)
        deadline = time.monotonic() + 30
        while len(log) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.3)  # room for a wrong fifth load to show up
        assert log == ["load 0", "load 1", "load 2", "load 3"]
        assert int(first["x"][0, 0]) == 0


def test_closing_early_stops_the_thread_and_closes_the_source() -> None:
    log: list[str] = []
    batches = Prefetcher(numbered_batches(100, log), depth=2)
    next(batches)
    batches.close()
    assert not live_prefetch_threads()
    assert log[-1] == "closed" and len(log) <= 6  # it stopped loading: far fewer than 100
    with pytest.raises(StopIteration):
        next(batches)
    batches.close()  # idempotent


def test_an_abandoned_prefetcher_stops_its_thread() -> None:
    batches = Prefetcher(numbered_batches(100), depth=1)
    next(batches)
    del batches
    gc.collect()
    for thread in live_prefetch_threads():
        thread.join(timeout=10)
    assert not live_prefetch_threads()


def test_bad_depth_is_refused() -> None:
    with pytest.raises(ValueError, match="depth must be >= 0"):
        Prefetcher(iter([]), depth=-1)


@pytest.mark.gpu
def test_pin_memory_pins_every_tensor() -> None:
    with Prefetcher(numbered_batches(2), depth=1, pin_memory=True) as batches:
        assert all(t.is_pinned() for batch in batches for t in batch.values())
