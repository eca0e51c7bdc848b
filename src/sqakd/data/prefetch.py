"""Batches made ahead in a background thread, so the next one is ready when a step ends.

:func:`prefetched` runs an iterator in one daemon thread and hands its items over through a
queue of at most ``depth`` items: the thread works at most ``depth`` batches ahead (plus the one
it is making) and then waits. Items come out in the order the iterator makes them, and the
iterator runs exactly as it would in the caller's thread: a loader whose batches depend only on
their position (:class:`~sqakd.data.BatchLoader`: order and augmentation seeded by epoch and
batch, private generators, no global random state) gives the same batches, bit for bit, and a
resumed run stays exact. An error in the thread is raised in the caller at the item where it
happened. Closing the returned generator early (a ``break``, ``train.max_steps_per_epoch``)
stops the thread and waits for it.

What it buys: the gather, crop, flip and normalisation of the next batch (and, on CUDA, its copy
to the GPU) overlap the step; PyTorch releases the GIL inside its operators. On a CPU with few
cores the thread competes with the step for them, so the gain there is small.

Not done: running the frozen teacher on the next batch while the student's backward runs. On a
CPU both are convolution work, each already spread over every core by PyTorch's intra-op
threads, so running them side by side only interleaves the same arithmetic on the same cores
(on 2 cores: no gain, more memory, a less cache-friendly schedule). It pays only where the
teacher gets units of its own: a second CUDA stream or device.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any, TypeVar

Item = TypeVar("Item")

#: what the thread puts in the queue after the last item
_DONE = object()
#: seconds between the thread's checks of the stop flag while the queue is full
_POLL_SECONDS = 0.05


class _Failure:
    """An exception raised in the thread, handed to the caller."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


def prefetched(items: Iterator[Item], depth: int = 1) -> Iterator[Item]:
    """``items``, made up to ``depth`` ahead in a background thread (``depth`` 0: ``items``
    itself, in the caller's thread)."""
    if depth < 0:
        raise ValueError(f"prefetch depth must be >= 0, got {depth}")
    if depth == 0:
        return items
    return _consume(items, depth)


def _consume(items: Iterator[Item], depth: int) -> Iterator[Item]:
    handoff: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()
    thread = threading.Thread(
        target=_produce, args=(items, handoff, stop), name="sqakd-prefetch", daemon=True
    )
    thread.start()
    try:
        while True:
            item = handoff.get()
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a thread waiting on a full queue, then let it end
            try:
                handoff.get(timeout=_POLL_SECONDS)
            except queue.Empty:
                pass
        thread.join()


def _produce(items: Iterator[Any], handoff: queue.Queue[Any], stop: threading.Event) -> None:
    try:
        for item in items:
            if not _put(handoff, item, stop):
                return
    except BaseException as error:  # noqa: BLE001 - handed to the caller, raised there
        _put(handoff, _Failure(error), stop)
        return
    _put(handoff, _DONE, stop)


def _put(handoff: queue.Queue[Any], item: Any, stop: threading.Event) -> bool:
    """Put ``item`` once there is room; ``False`` when the caller stopped first."""
    while not stop.is_set():
        try:
            handoff.put(item, timeout=_POLL_SECONDS)
            return True
        except queue.Full:
            continue
    return False
