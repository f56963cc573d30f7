"""A TCP relay on loopback that delays every byte: a WAN link, or a latency spike, on
one machine, for the demo's benchmarks and the chaos runs.

Unlike an in-process sleep, the delay sits on the real socket path between two real
processes, so gRPC's own timers, keepalives and flow control see it. `one_way_ms` may
change while connections are open (a spike); chunks already queued keep their due time.
"""

from __future__ import annotations

import asyncio


class DelayProxy:
    """A TCP relay on loopback that holds every chunk of bytes for `one_way_ms` each way.

    Per connection and direction, a reader stamps each chunk with its arrival time and queues
    it; a writer sends each chunk when its time comes, in order. Latency is added without
    limiting throughput: chunks in flight overlap, as on a long link (a sleep in the reader
    would serialise them). `bytes_up` (edge to verifier) and `bytes_down` count TCP payload.
    """

    def __init__(self, upstream_port: int, one_way_ms: float) -> None:
        self.upstream_port = upstream_port
        self.one_way_ms = one_way_ms
        self.bytes_up = 0
        self.bytes_down = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stops listening and closes every relayed connection."""
        if self._server is not None:
            self._server.close()
        for writer in self._writers:
            writer.close()
        await asyncio.gather(*self._connections, return_exceptions=True)

    async def _relay(self, edge_reader: asyncio.StreamReader, edge: asyncio.StreamWriter) -> None:
        self._connections.add(asyncio.current_task())
        self._writers.add(edge)
        verifier = None
        try:
            verifier_reader, verifier = await asyncio.open_connection(
                "127.0.0.1", self.upstream_port
            )
            self._writers.add(verifier)
            await asyncio.gather(
                self._pipe(edge_reader, verifier, up=True),
                self._pipe(verifier_reader, edge, up=False),
            )
        except OSError:
            pass  # either side went away: close both
        finally:
            for writer in (edge, verifier):
                if writer is not None:
                    writer.close()
                    self._writers.discard(writer)
            self._connections.discard(asyncio.current_task())

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, up: bool
    ) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def send() -> None:
            while True:
                due, data = await queue.get()
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if not data:  # the other side half-closed: pass it on
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                writer.write(data)
                await writer.drain()

        sender = asyncio.create_task(send())
        try:
            while data := await reader.read(1 << 16):
                if up:
                    self.bytes_up += len(data)
                else:
                    self.bytes_down += len(data)
                queue.put_nowait((loop.time() + self.one_way_ms / 1000, data))
            queue.put_nowait((loop.time() + self.one_way_ms / 1000, b""))
            await sender
        finally:
            sender.cancel()
