"""``python -m qvm.supervisor RUNDIR QEMU_PID HOW``: the supervisor proper, exec'd by
``qvm.supervisor.spawn.start`` once QEMU runs. It imports asyncio and qemu.qmp (without
TLS) only here, then hands over to ``qvm.supervisor.process``.
"""

from __future__ import annotations

import os
import sys
import types

from qvm.errors import RecordError
from qvm.layout.runfiles import LAUNCH_FILE
from qvm.store.launch import read_launch
from qvm.supervisor.foreground import FOREGROUND_ENV
from qvm.supervisor.spawn import AdoptedQemu


def main(argv: list[str]) -> int:
    """``python -m qvm.supervisor RUNDIR QEMU_PID answered|silent|exited=CODE``, exec'd
    by ``start``: whether QMP answered, or QEMU's exit code if it has already ended."""
    run_path, qemu = argv[0], AdoptedQemu(int(argv[1]))
    answered = argv[2] == "answered"
    if argv[2].startswith("exited="):
        qemu.returncode = int(argv[2].removeprefix("exited="))
    ready_fd = int(os.environ["QVM_READY_FD"]) if "QVM_READY_FD" in os.environ else None
    # `qvm up --foreground`: this process is the one that ran it (qvm.supervisor.foreground)
    foreground = os.environ.pop(FOREGROUND_ENV, None)
    stop_budget = float(foreground) if foreground else None
    # the inherited lock fd stays open for our whole life: it is what says we are alive
    path = os.path.join(run_path, LAUNCH_FILE)
    try:
        launch = read_launch(path)
    except RecordError as error:  # `qvm up` wrote it just before: someone changed it since
        sys.stderr.write(f"qvm supervisor: {error}\n")
        return 1
    if launch is None:
        sys.stderr.write(f"qvm supervisor: {path}: missing\n")
        return 1

    load_asyncio_without_tls()
    from qvm.supervisor.process import run_supervisor  # noqa: PLC0415 -- after that

    return run_supervisor(run_path, launch, ready_fd, qemu, answered, stop_budget)


def load_asyncio_without_tls() -> None:
    """Import asyncio and qemu.qmp without the ssl module, which maps libssl and libcrypto:
    4 MiB of the supervisor's RSS budget of 20, for TLS it never uses (its sockets are
    unix sockets). asyncio runs without TLS support when ``import ssl`` fails; qemu.qmp
    only names ``ssl.SSLContext`` in signatures, so it gets a stand-in for that name.
    """
    sys.modules["ssl"] = None  # type: ignore[assignment]  # makes `import ssl` fail
    import asyncio  # noqa: F401, PLC0415 -- only once ssl cannot be imported

    stand_in = types.ModuleType("ssl", "qvm's supervisor runs without TLS")
    stand_in.SSLContext = type("SSLContext", (), {})  # type: ignore[attr-defined]
    sys.modules["ssl"] = stand_in
    import qemu.qmp  # noqa: F401, PLC0415 -- only with the stand-in for ssl


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
