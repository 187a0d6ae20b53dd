"""The guest agent's channel, held open by the supervisor for as long as QEMU runs.

qemu-ga sleeps 100 ms at a time whenever the host end of its virtio-serial port is closed
(qga/main.c: "virtio causes us to spin here when no process is attached to host-side
chardev. sleep a bit to mitigate this"). A client that connects to QEMU's chardev anew
therefore waits up to 100 ms for its first reply, and back-to-back commands (`status`
twice, `cpu del` after `cpu add`) wait the whole 100 ms: measured, 110 ms a call at once
against 12-18 ms with a pause. libvirt keeps its agent connection for the domain's
lifetime for the same reason.

So QEMU's end is ``qga.sock``, which only the supervisor connects to, once QMP answers;
``agent.sock`` is the supervisor's, and lends that connection to one client at a time,
byte for byte. The protocol is ``qvm.supervisor.agent_wire``, which every client speaks:
each client resynchronises first, so a reply that was meant for an earlier client,
dropped here while no client is attached or read by the next one, is never taken for an
answer. The socket
exists exactly while the connection does: no ``agent.sock`` means no QEMU to talk to.
"""

from __future__ import annotations

import asyncio
import contextlib

from qvm.layout.runfiles import AGENT_CHARDEV_SOCKET, AGENT_SOCKET, RunFiles
from qvm.supervisor.spawn import log_line

CHUNK = 256 * 1024  # guest-file-read and guest-exec-status replies run to megabytes


class AgentProxy:
    def __init__(self, run: RunFiles) -> None:
        self.run = run
        self._upstream: asyncio.StreamWriter | None = None
        self._client: asyncio.StreamWriter | None = None
        self._server: asyncio.AbstractServer | None = None
        self._pump: asyncio.Task[None] | None = None
        self._turn = asyncio.Lock()  # QEMU's chardev served one client at a time: so do we

    async def attach(self) -> None:
        """Connect to QEMU's agent chardev (it listens once QMP answers) and open
        ``agent.sock``; a failure is logged, and the VM runs without the channel."""
        try:
            reader, writer = await asyncio.open_unix_connection(self.run.file(AGENT_CHARDEV_SOCKET))
        except OSError as error:
            log_line(f"qvm supervisor: guest agent channel: {error.strerror or error}")
            return
        self._upstream = writer
        self._pump = asyncio.create_task(self._to_client(reader))
        self.run.remove(AGENT_SOCKET)  # a killed supervisor's
        try:
            self._server = await asyncio.start_unix_server(
                self._serve, path=self.run.file(AGENT_SOCKET)
            )
        except OSError as error:
            log_line(f"qvm supervisor: {self.run.file(AGENT_SOCKET)}: {error.strerror or error}")
            await self.detach()

    async def detach(self) -> None:
        """QEMU ended (or is about to): close the socket, the client, the connection."""
        if self._server is not None:
            self._server.close()
            self._server = None
        self.run.remove(AGENT_SOCKET)
        for writer in (self._client, self._upstream):
            if writer is not None:
                writer.close()
        self._client = self._upstream = None
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._pump
            self._pump = None

    async def _to_client(self, reader: asyncio.StreamReader) -> None:
        """The agent's bytes go to the client attached now, or nowhere."""
        with contextlib.suppress(OSError):
            while data := await reader.read(CHUNK):
                client = self._client
                if client is not None:
                    with contextlib.suppress(OSError):
                        client.write(data)
                        await client.drain()
        # QEMU closed its end: it is exiting; the attached client learns it at once
        if self._client is not None:
            self._client.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async with self._turn:
            upstream = self._upstream
            if upstream is None or upstream.is_closing():
                writer.close()
                return
            self._client = writer
            try:
                with contextlib.suppress(OSError):
                    while data := await reader.read(CHUNK):
                        upstream.write(data)
                        await upstream.drain()
            finally:
                self._client = None
                writer.close()
