"""``ordered_map``: ``map`` over worker processes, in input order, with a bounded amount of work in flight.

Built on ``concurrent.futures.ProcessPoolExecutor`` (fork context): an early stop (the consumer closed the generator,
e.g. ``on_bad: fail``) cancels what has not started and lets the workers leave on the executor's end sentinels. It
never signals workers. ``multiprocessing.Pool`` did (``terminate()`` on an early stop), and its worker handler thread
could start a replacement worker during ``terminate()`` that was never signalled; ``join()`` then waited for it
forever (it sat on the task queue's lock, which ``terminate()`` holds). That hung the test suite once in a while.
"""

from __future__ import annotations

import multiprocessing
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from itertools import islice
from typing import Any


def _apply(fn: Callable, chunk: list) -> list:
    return [fn(x) for x in chunk]


def ordered_map(fn: Callable, items: Iterable, workers: int, window: int = 256, chunksize: int = 8) -> Iterator[Any]:
    """``map(fn, items)`` over ``workers`` processes (in this process when ``workers <= 1``), in input order, with
    at most ``max(window, 2 * chunksize * workers)`` items taken from ``items`` ahead of the consumer: memory does
    not grow with the dataset. ``fn`` must be picklable (a module-level function)."""
    if workers <= 1:
        yield from map(fn, items)
        return
    in_flight = max(window, 2 * chunksize * workers) // chunksize  # chunks submitted and not yet consumed
    it = iter(items)
    pending: deque = deque()
    ex = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
    try:
        while True:
            while len(pending) < in_flight and (chunk := list(islice(it, chunksize))):
                pending.append(ex.submit(_apply, fn, chunk))
            if not pending:
                return
            yield from pending.popleft().result()
    finally:  # done, an error, or the consumer stopped early: nothing new starts, running chunks finish
        ex.shutdown(wait=True, cancel_futures=True)
