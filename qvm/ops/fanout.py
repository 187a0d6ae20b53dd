"""Several VMs at once: ``run_all`` runs one VM's use case for each of several VMs, at
most ``jobs`` at a time, and hands each outcome over as soon as it is there, so that the
CLI prints a VM's line when that VM is done rather than when the slowest is.

Threads, not processes: the work is waiting (a supervisor's reply, QMP's greeting, a
process's end), and each use case already runs in a process of its own where it computes
(QEMU, the supervisor). A failure is one VM's outcome, never the others' end: every item
gets exactly one ``Finished``, whatever its work raised.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Generic, TypeVar

from qvm.base.record import Record

Item = TypeVar("Item")
Result = TypeVar("Result")

# `down --all` of 16 booted VMs: 16 at once took 1.23 s, 4 at once 1.46 s (docs/speed.md);
# more at once than this only adds forks and sockets, not speed, on a host this size
MAX_JOBS = 16
TICK_SECONDS = 0.1


class Finished(Record, Generic[Item, Result]):
    """One item's outcome: its result, or what its work raised (then ``result`` is None)."""

    position: int  # the item's place in the sequence given
    item: Item
    result: Result | None
    error: BaseException | None


def default_jobs(count: int) -> int:
    """How many at once when the user does not say: all of them, up to ``MAX_JOBS``."""
    return max(1, min(count, MAX_JOBS))


def run_all(
    items: Sequence[Item],
    work: Callable[[Item], Result],
    jobs: int,
    tick: Callable[[], None] | None = None,
) -> Iterator[Finished[Item, Result]]:
    """``work(item)`` for every item, at most ``jobs`` at a time, each outcome yielded as
    it finishes (``len(items)`` of them in all). ``tick`` is called every
    ``TICK_SECONDS`` while none finishes (a spinner turns).

    The threads are daemons: an interrupted caller does not wait for them."""
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")
    todo: queue.SimpleQueue[int] = queue.SimpleQueue()
    for index in range(len(items)):
        todo.put(index)
    done: queue.SimpleQueue[Finished[Item, Result]] = queue.SimpleQueue()

    def worker() -> None:
        while True:
            try:
                index = todo.get_nowait()
            except queue.Empty:
                return
            item = items[index]
            try:
                outcome = Finished(index, item, work(item), None)
            except BaseException as error:  # noqa: BLE001 - the caller decides what it means
                outcome = Finished(index, item, None, error)
            done.put(outcome)

    for _ in range(min(jobs, len(items))):
        threading.Thread(target=worker, daemon=True).start()
    for _ in items:
        while True:
            try:
                outcome = done.get(timeout=TICK_SECONDS)
            except queue.Empty:
                if tick is not None:
                    tick()
                continue
            break
        yield outcome
