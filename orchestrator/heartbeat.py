"""An asyncio task that keeps one node registered, and registers it again when Redis forgot it.

Every `interval_s` (a third of the TTL by default, so two beats may be lost before the node
drops out) the task refreshes the node's TTL. When the heartbeat finds no hash, because
the node expired during a long pause or because Redis restarted empty, it registers the
node again (a 'join' event). While Redis cannot be reached it logs one warning and
retries every half second; the redis-py client reconnects by itself and reloads the
scripts (`NOSCRIPT`) once the server is back. A node that starts while Redis is down
(a supervisor restarting it during the same outage) waits up to `start_timeout_s` for
it; a refused password or a bad URL still fails at once. No password reaches the log:
messages name the node and the exception, and redis-py's connection errors name only
host and port.

    async with HeartbeatTask(AsyncRegistry(connect_async(url)), node, ttl_s=10):
        await serve_forever()
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from redis.exceptions import AuthenticationError, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from orchestrator.registry import AsyncRegistry, NodeInfo, NodeStats, check_positive

logger = logging.getLogger(__name__)

# Seconds between beats while Redis is unreachable.
RETRY_S = 0.5


class HeartbeatTask:
    """Registers `node` on `start`, refreshes it until `stop`, deregisters on `stop`.

    `stats`, when given, is called at every beat and its result stored with the node.
    `start` raises if the first registration fails (a wrong URL or password should stop
    the node, not leave it silently unregistered); failures after that are retried.
    """

    def __init__(
        self,
        registry: AsyncRegistry,
        node: NodeInfo,
        *,
        ttl_s: float = 10.0,
        interval_s: float | None = None,
        stats: Callable[[], NodeStats] | None = None,
        start_timeout_s: float = 30.0,
    ) -> None:
        check_positive("ttl_s", ttl_s)
        self.start_timeout_s = check_positive("start_timeout_s", start_timeout_s)
        interval_s = ttl_s / 3 if interval_s is None else interval_s
        if check_positive("interval_s", interval_s) >= ttl_s:
            raise ValueError(f"interval_s: must be < ttl_s ({ttl_s}), got {interval_s}")
        self.registry = registry
        self.node = node
        self.ttl_s = ttl_s
        self.interval_s = interval_s
        self._stats = stats
        self._task: asyncio.Task[None] | None = None
        self._registrations = 0

    @property
    def registrations(self) -> int:
        """How many times the node was (re)registered: 1 after `start`, +1 per recovery."""
        return self._registrations

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def start(self) -> None:
        if self._task is not None:
            raise RuntimeError(f"heartbeat for {self.node.node_id} already started")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.start_timeout_s
        warned = False
        while True:
            try:
                await self._register()
                break
            except AuthenticationError:
                raise
            except (RedisConnectionError, RedisTimeoutError) as exc:
                if loop.time() >= deadline:
                    raise
                if not warned:
                    logger.warning("registering %s: %r; retrying", self.node.node_id, exc)
                    warned = True
                await asyncio.sleep(RETRY_S)
        self._task = asyncio.create_task(self._run(), name=f"heartbeat:{self.node.node_id}")

    async def stop(self, *, deregister: bool = True) -> None:
        """Stops beating; with `deregister`, takes the node out of rotation at once ('leave')."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        if deregister:
            try:
                await self.registry.deregister(self.node.node_id)
            except RedisError as exc:
                logger.warning("could not deregister %s: %r", self.node.node_id, exc)

    async def __aenter__(self) -> HeartbeatTask:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def beat(self) -> None:
        """One beat: refresh the TTL, register again if Redis lost the node, push stats."""
        if not await self.registry.heartbeat(self.node.node_id, ttl_s=self.ttl_s):
            await self._register()
            logger.info(
                "%s was not registered (expired, or Redis restarted): registered again",
                self.node.node_id,
            )
        if self._stats is not None:
            await self.registry.update_stats(self.node.node_id, self._stats())

    async def _register(self) -> None:
        await self.registry.register(self.node, ttl_s=self.ttl_s)
        self._registrations += 1

    async def _run(self) -> None:
        """Beats every `interval_s`; after a failed beat, retries every half second at most,
        so that a restarted Redis has the node back within that, not one interval later."""
        failing = False
        while True:
            await asyncio.sleep(min(self.interval_s, RETRY_S) if failing else self.interval_s)
            try:
                await self.beat()
                failing = False
            except RedisError as exc:
                if not failing:
                    logger.warning("heartbeat for %s failed: %r", self.node.node_id, exc)
                failing = True
