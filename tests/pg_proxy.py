"""A TCP forwarder on localhost, in front of the test Postgres, that a test controls.

    async with TcpProxy.running("127.0.0.1", 5432) as proxy:
        url = proxy.url(pg_url)          # the same database, through the proxy
        proxy.pause()                    # blackhole: nothing goes through either way, no error
        proxy.resume()

`hold_closes=True` keeps the client's side of a connection open after the server closed its
side (until `release_closes()`), which widens the moment between a server's FATAL message and
the client noticing the closed socket: the state a pooled connection is in right after
pg_terminate_backend.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from urllib.parse import urlsplit, urlunsplit

import anyio
from anyio.abc import SocketAttribute, SocketStream, TaskGroup


class TcpProxy:
    def __init__(self, target_host: str, target_port: int, *, hold_closes: bool = False) -> None:
        self.target = (target_host, target_port)
        self.hold_closes = hold_closes
        self.port = 0
        self.connections = 0  # accepted so far
        self.server_closes = 0  # connections whose server side has closed
        self._flowing = anyio.Event()
        self._flowing.set()
        self._closes = anyio.Event()

    @classmethod
    @asynccontextmanager
    async def running(
        cls, target_host: str, target_port: int, *, hold_closes: bool = False
    ) -> AsyncIterator[TcpProxy]:
        proxy = cls(target_host, target_port, hold_closes=hold_closes)
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        proxy.port = listener.extra(SocketAttribute.local_port)
        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, proxy._handle, tg)
            try:
                yield proxy
            finally:
                proxy.resume()
                proxy.release_closes()
                tg.cancel_scope.cancel()
        await listener.aclose()

    def url(self, database_url: str) -> str:
        """`database_url` with its host and port replaced by the proxy's."""
        parts = urlsplit(database_url)
        auth = parts.netloc.rpartition("@")[0]
        netloc = f"{auth}@127.0.0.1:{self.port}" if auth else f"127.0.0.1:{self.port}"
        return urlunsplit(parts._replace(netloc=netloc))

    def pause(self) -> None:
        """Blackhole: bytes in flight stay where they are, new connections get no answer."""
        if self._flowing.is_set():
            self._flowing = anyio.Event()

    def resume(self) -> None:
        self._flowing.set()

    def release_closes(self) -> None:
        self._closes.set()

    async def _handle(self, client: SocketStream) -> None:
        self.connections += 1
        async with client:
            await self._flowing.wait()
            try:
                server = await anyio.connect_tcp(*self.target)
            except OSError:
                return
            async with server, anyio.create_task_group() as tg:
                tg.start_soon(self._pump, client, server, tg, False)
                tg.start_soon(self._pump, server, client, tg, True)

    async def _pump(
        self, src: SocketStream, dst: SocketStream, tg: TaskGroup, from_server: bool
    ) -> None:
        with suppress(anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
            while True:
                chunk = await src.receive()
                while not self._flowing.is_set():
                    await self._flowing.wait()
                await dst.send(chunk)
        if from_server:
            self.server_closes += 1
            if self.hold_closes:
                await self._closes.wait()
        tg.cancel_scope.cancel()  # one side closed: close both
