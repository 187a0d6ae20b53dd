"""The supervisor's agent proxy against a stand-in for QEMU's chardev (a unix socket server
that records what reaches it): one lasting connection upstream, clients one at a time,
bytes both ways unchanged, nothing left behind. The real agent behind it is exercised by
every integration test that talks to a guest agent."""

from __future__ import annotations

import asyncio
from pathlib import Path

from qvm.layout.rundir import RunDir
from qvm.layout.runfiles import RunFiles
from qvm.supervisor.agent_proxy import AgentProxy


class Chardev:
    """QEMU's end: counts connections, keeps what arrives, answers on request."""

    def __init__(self) -> None:
        self.connections = 0
        self.received = bytearray()
        self.writer: asyncio.StreamWriter | None = None

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writer = writer
        while data := await reader.read(65536):
            self.received += data

    async def say(self, data: bytes) -> None:
        assert self.writer is not None
        self.writer.write(data)
        await self.writer.drain()


async def _until(check, timeout: float = 2.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.005)


def _run_dir(tmp_path: Path) -> RunDir:
    run = RunDir(tmp_path / "vm1")
    run.path.mkdir()
    return run


def test_clients_take_turns_on_one_lasting_connection(tmp_path: Path) -> None:
    async def scenario() -> None:
        run = _run_dir(tmp_path)
        chardev = Chardev()
        server = await asyncio.start_unix_server(chardev.serve, str(run.agent_chardev_socket))
        proxy = AgentProxy(RunFiles(str(run.path)))
        await proxy.attach()
        assert run.agent_socket.exists()

        # bytes from the agent while nobody listens are dropped, not kept for the next
        await _until(lambda: chardev.writer is not None)
        await chardev.say(b"stale\n")
        await asyncio.sleep(0.05)

        reader1, writer1 = await asyncio.open_unix_connection(str(run.agent_socket))
        reader2, writer2 = await asyncio.open_unix_connection(str(run.agent_socket))
        big = bytes(range(256)) * 4096  # 1 MiB, every byte value
        writer1.write(b"\xff" + big)
        await writer1.drain()
        await _until(lambda: len(chardev.received) == len(big) + 1)
        assert bytes(chardev.received) == b"\xff" + big
        await chardev.say(b"for one\n")
        assert await reader1.readline() == b"for one\n"

        # the second client waits its turn: what it sends goes up only after the first left
        writer2.write(b"two\n")
        await writer2.drain()
        await asyncio.sleep(0.1)
        assert bytes(chardev.received).endswith(big)
        writer1.close()
        await _until(lambda: chardev.received.endswith(b"two\n"))
        await chardev.say(b"for two\n")
        assert await reader2.readline() == b"for two\n"
        assert chardev.connections == 1  # the guest never saw the host end close

        # QEMU ends: the client learns it, the socket goes
        assert chardev.writer is not None
        chardev.writer.close()
        assert await reader2.read() == b""
        await proxy.detach()
        assert not run.agent_socket.exists()
        writer2.close()
        server.close()

    asyncio.run(scenario())


def test_no_chardev_no_agent_socket(tmp_path: Path) -> None:
    async def scenario() -> None:
        run = _run_dir(tmp_path)
        proxy = AgentProxy(RunFiles(str(run.path)))
        await proxy.attach()  # nothing listens on qga.sock: logged, no socket offered
        assert not run.agent_socket.exists()
        await proxy.detach()

    asyncio.run(scenario())
