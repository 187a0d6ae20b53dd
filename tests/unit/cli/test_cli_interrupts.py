"""What qvm says when Ctrl-C ends a command whose work goes on elsewhere."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from qvm.layout.rundir import RunDir


def test_ctrl_c_on_down_says_the_stop_goes_on_in_the_background(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Once the supervisor took the request it stops the VM whoever waits: "interrupted"
    alone read as if the VM were left running."""
    from qvm.cli import resolve
    from qvm.cli.commands.vm import down
    from qvm.ops import stop as stop_module

    def accepted_then_interrupted(run: RunDir, *args: Any) -> None:
        args[-1]()  # on_accepted: the supervisor has it
        raise KeyboardInterrupt

    monkeypatch.setattr(resolve, "run_dir_of", lambda name: RunDir(tmp_path / name))
    monkeypatch.setattr(stop_module, "stop", accepted_then_interrupted)
    with pytest.raises(SystemExit) as done:
        down(["vm1"], 30.0, False, False, False, None)
    assert done.value.code == 130
    assert capsys.readouterr().err == (
        "qvm: vm1: interrupted; the supervisor goes on stopping it in the background "
        "(hint: qvm status vm1 says when it is stopped; qvm kill vm1 ends it at once)\n"
    )

    def interrupted_before(run: RunDir, *args: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(stop_module, "stop", interrupted_before)
    with pytest.raises(KeyboardInterrupt):  # nothing asked: plain "interrupted" (qvm.cli.app)
        down(["vm1"], 30.0, False, False, False, None)
