"""Atomic JSON writes from several threads of one process (`qvm up` of several VMs runs
each in a thread, qvm.ops.fanout): each write is whole, none fails for another's
temporary file."""

from __future__ import annotations

import json
import threading
from pathlib import Path

from qvm.base.jsonfile import write_text_atomic


def test_threads_writing_one_file_at_once_each_write_whole(tmp_path: Path) -> None:
    target = tmp_path / "cache.json"
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def writer(number: int) -> None:
        start.wait()
        try:
            for round_ in range(100):
                text = json.dumps({"writer": number, "round": round_})
                write_text_atomic(target, text, durable=False)
        except BaseException as error:  # noqa: BLE001 - collected for the assertion
            errors.append(error)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert json.loads(target.read_text())["round"] == 99
    assert [p.name for p in tmp_path.iterdir()] == ["cache.json"]  # no temporary file left
