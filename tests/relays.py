"""Relays in front of a real service, for what the embedded Tansu and valkey lack (TLS, SASL).

A `Relay` listens on a loopback port (with TLS when given an ``ssl.SSLContext``) and, for each
connection, opens one to the service's port, asks `Relay.admit` (by default yes), and copies
bytes both ways. It runs its own event loop on a thread, and on exit ends every
connection at once, so no task outlives it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
from typing import Self

from worker.dev.services import LOOPBACK


class Relay:
    def __init__(self, port: int, target: int, *, context: ssl.SSLContext | None = None) -> None:
        self.port, self.target, self.context = port, target, context
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name=type(self).__name__, daemon=True)
        self._open: set[asyncio.StreamWriter] = set()
        self._closing = False

    def __enter__(self) -> Self:
        self._thread.start()
        assert self._ready.wait(10), f"{type(self).__name__} did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()

    async def admit(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        upstream_reader: asyncio.StreamReader,
        upstream: asyncio.StreamWriter,
    ) -> bool:
        """Whether this client connection may be relayed; a gate (SASL, say) talks to the client
        here first. By default every connection may."""
        return True

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self._server = self.loop.run_until_complete(
            asyncio.start_server(self._connection, LOOPBACK, self.port, ssl=self.context)
        )
        self._ready.set()
        self.loop.run_forever()

    async def _shutdown(self) -> None:
        """Stop accepting, then close every connection (also those accepted meanwhile) and let
        each handler run to its end: a task cancelled before it ran would leave its socket open."""
        self._closing = True
        self._server.close()
        for _ in range(100):
            for end in list(self._open):
                _close(end)
            tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            if not tasks:
                break
            await asyncio.wait(tasks, timeout=0.1)
        await asyncio.sleep(0.05)  # the closed transports' connection_lost callbacks close the sockets

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ends = [writer]
        self._open.add(writer)
        try:
            if self._closing:
                return
            upstream_reader, upstream = await asyncio.open_connection(LOOPBACK, self.target)
            ends.append(upstream)
            self._open.add(upstream)
            if await self.admit(reader, writer, upstream_reader, upstream):
                await asyncio.gather(pipe(reader, upstream), pipe(upstream_reader, writer))
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            for end in ends:
                self._open.discard(end)
                _close(end)


def _close(end: asyncio.StreamWriter) -> None:
    end.close()
    end.transport.abort()  # at once: a TLS close would wait for the peer


async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    """Copy ``source`` to ``sink`` until either end closes."""
    with contextlib.suppress(ConnectionError, OSError, ssl.SSLError):
        while data := await source.read(65536):
            sink.write(data)
            await sink.drain()
