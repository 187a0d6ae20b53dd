"""qvm agent: does the VM's guest agent answer, which version, which commands."""

from __future__ import annotations

from qvm.cli import resolve
from qvm.cli.output import emit_json, say
from qvm.cli.parsing.declare import MACHINE, Commands, Option

commands = Commands()


@commands.command("agent")
def agent(
    name: str = MACHINE,
    timeout: float = Option(5.0, "--timeout", help="Seconds to wait for each reply."),
    as_json: bool = Option(
        False, "--json", help="Print JSON (the schema named below). An error is JSON too."
    ),
) -> None:
    """Ping the QEMU guest agent (qemu-ga) in the VM; show its version and commands.

    Exits 1 with one line when the VM has no agent channel, or no agent answers.

    JSON: schemas/agent.json
    """
    import time

    from qvm.cli.progress import waiting
    from qvm.control.agent import open_agent

    run = resolve.run_dir_of(name)
    started = time.monotonic()
    with (
        waiting(f"{name}: waiting for the guest agent"),
        open_agent(run, sync_timeout=timeout) as client,
    ):
        client.ping(timeout=timeout)
        ping = time.monotonic() - started
        info = client.info(timeout=timeout)
    if as_json:
        emit_json(
            {"name": name, "answering": True, "ping_seconds": round(ping, 3), **info.to_json()}
        )
        return
    enabled = info.enabled()
    say(f"{name}: guest agent {info.version} answering ({ping * 1000:.0f} ms)")
    say(f"  commands ({len(enabled)}): {' '.join(enabled)}")
    disabled = [c.name for c in info.commands if not c.enabled]
    if disabled:
        say(f"  disabled ({len(disabled)}): {' '.join(sorted(disabled))}")
