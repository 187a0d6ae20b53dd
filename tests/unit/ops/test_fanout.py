"""The executor of commands about several VMs (qvm.ops.fanout): every item gets exactly
one outcome, handed over as it finishes, never more than ``jobs`` at once, and one item's
failure is its own."""

from __future__ import annotations

import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qvm.errors import QvmError
from qvm.ops.fanout import MAX_JOBS, default_jobs, run_all


@settings(max_examples=40, deadline=None)
@given(
    items=st.lists(st.integers(min_value=-5, max_value=50), max_size=20),
    jobs=st.integers(min_value=1, max_value=8),
)
def test_every_item_gets_one_outcome_and_a_failure_is_its_own(items: list[int], jobs: int) -> None:
    def work(item: int) -> int:
        if item < 0:
            raise QvmError(f"vm{item}: failed")
        return item * 2

    outcomes = list(run_all(items, work, jobs))
    assert sorted(o.position for o in outcomes) == list(range(len(items)))
    for outcome in outcomes:
        assert outcome.item == items[outcome.position]
        if outcome.item < 0:
            assert outcome.result is None and isinstance(outcome.error, QvmError)
            assert str(outcome.error) == f"vm{outcome.item}: failed"
        else:
            assert outcome.result == outcome.item * 2 and outcome.error is None


def test_outcomes_come_as_they_finish_not_as_given() -> None:
    delays = {"slow": 0.4, "quick": 0.0, "middle": 0.2}
    order = [o.item for o in run_all(list(delays), lambda name: time.sleep(delays[name]), 3)]
    assert order == ["quick", "middle", "slow"]


@pytest.mark.parametrize("jobs", [1, 2, 3])
def test_never_more_than_jobs_at_once(jobs: int) -> None:
    lock = threading.Lock()
    running = [0]
    most = [0]

    def work(_: int) -> None:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.05)
        with lock:
            running[0] -= 1

    assert len(list(run_all(range(8), work, jobs))) == 8
    assert most[0] == jobs  # the bound, and reached: the items did run at once


def test_at_once_means_the_time_of_the_slowest_not_the_sum() -> None:
    started = time.monotonic()
    list(run_all(range(6), lambda _: time.sleep(0.3), 6))
    assert time.monotonic() - started < 1.0  # 6 x 0.3 s one after the other: 1.8 s


def test_any_exception_is_an_outcome_so_the_caller_never_waits_forever() -> None:
    def work(item: int) -> int:
        if item == 1:
            raise KeyError("a bug")
        return item

    outcomes = {o.item: o for o in run_all([0, 1, 2], work, 2)}
    assert isinstance(outcomes[1].error, KeyError)
    assert outcomes[0].result == 0 and outcomes[2].result == 2


def test_tick_turns_while_nothing_finishes() -> None:
    ticks = []
    list(run_all([0], lambda _: time.sleep(0.35), 1, tick=lambda: ticks.append(1)))
    assert len(ticks) >= 2


def test_jobs_must_be_one_or_more_and_the_default_is_all_up_to_the_cap() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        list(run_all([1], lambda x: x, 0))
    assert default_jobs(0) == 1
    assert default_jobs(6) == 6
    assert default_jobs(100) == MAX_JOBS
