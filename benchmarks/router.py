"""Routing overhead per request: one pick plus one release, against fleets of growing size.

For each fleet size N (default 10, 1,000 and 10,000 cloud nodes, capacity 8, spread over 4
regions x 2 tiers) the benchmark registers the nodes, takes N/2 background leases so that
utilisation varies, then times `pick` + `release` pairs one after another from a single
client. Requests rotate through no label filter, a region filter and a region+tier filter,
each with a fresh session id (affinity miss, binding written). The baseline is two PINGs,
the two round trips a pick and a release cost at the very least, so the ratio is the
overhead of the Lua scripts themselves; "in Redis" is the mean time the server spent
executing them (INFO commandstats), which no client-side noise inflates.

The pick reads only the lowest-utilisation `window` entries of one sorted set (no scan), so
its cost grows like log N; the table shows p50 and p99, and the JSON on the last line has
the same figures plus the machine.

    python benchmarks/router.py                      # private redis-server on loopback
    python benchmarks/router.py --redis-url redis://localhost:6379/0   # a server of yours
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import random
import statistics
import time
import uuid
from collections.abc import Callable, Sequence
from contextlib import ExitStack

import redis
from common import cpu_model

from orchestrator.loadtest.records import percentile
from orchestrator.placement import Placement, PlacementConfig
from orchestrator.redis_server import RedisServer
from orchestrator.registry import Keyspace, NodeInfo, Registry, connect

REGIONS = ("eu", "us", "ap", "sa")
TIERS = ("gpu", "cpu")
MODEL = "target"


def timed(operation: Callable[[int], object], requests: int, warmup: int) -> list[float]:
    """Milliseconds per call of operation(i), after `warmup` untimed calls."""
    for i in range(warmup):
        operation(i)
    samples = []
    for i in range(requests):
        start = time.perf_counter()
        operation(i)
        samples.append((time.perf_counter() - start) * 1000)
    return samples


def run_size(
    client: redis.Redis, nodes: int, requests: int, warmup: int, window: int, seed: int
) -> dict[str, float]:
    keyspace = Keyspace(prefix=f"bench-{uuid.uuid4().hex[:8]}")
    registry = Registry(client, keyspace=keyspace)
    placement = Placement(
        client,
        keyspace=keyspace,
        config=PlacementConfig(lease_ttl_s=600, affinity_ttl_s=600, window=window),
        rng=random.Random(seed),
    )
    rng = random.Random(seed)
    try:
        for i in range(nodes):
            node = NodeInfo(
                node_id=f"cloud-{i:05d}",
                kind="cloud",
                address=f"10.0.{i // 250}.{i % 250}:50051",
                models=(MODEL,),
                capacity=8,
                labels={"region": REGIONS[i % 4], "tier": TIERS[(i // 4) % 2]},
            )
            registry.register(node, ttl_s=600)
        for _ in range(nodes // 2):
            placement.pick("cloud", MODEL, labels={"region": rng.choice(REGIONS)})

        filters = [
            {},
            *({"region": r} for r in REGIONS),
            *({"region": r, "tier": t} for r in REGIONS for t in TIERS),
        ]

        sessions = itertools.count()

        def route(i: int) -> None:
            session_id = f"s{next(sessions)}"  # a fresh session each time: affinity miss
            lease = placement.pick(
                "cloud", MODEL, labels=filters[i % len(filters)], session_id=session_id
            )
            assert lease is not None, "fleet full: raise capacity or lower the background load"
            placement.release(lease)

        def baseline(i: int) -> None:
            client.ping()
            client.ping()

        before = client.info("commandstats")["cmdstat_evalsha"]
        routing = timed(route, requests, warmup)
        after = client.info("commandstats")["cmdstat_evalsha"]
        pings = timed(baseline, requests, warmup)
    finally:
        for key in client.scan_iter(match=f"{keyspace.prefix}:*", count=10_000):
            client.unlink(key)
    return {
        "nodes": nodes,
        "p50_ms": percentile(routing, 50),
        "p99_ms": percentile(routing, 99),
        "mean_ms": statistics.fmean(routing),
        # Time Redis spent inside the two scripts, mean per request (from INFO commandstats).
        "server_ms": 2e-3 * (after["usec"] - before["usec"]) / (after["calls"] - before["calls"]),
        "baseline_p50_ms": percentile(pings, 50),
        "baseline_p99_ms": percentile(pings, 99),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10,1000,10000", help="fleet sizes, comma-separated")
    parser.add_argument("--requests", type=int, default=3000, help="timed pick+release pairs")
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--window", type=int, default=PlacementConfig.window)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--redis-url", help="use this server instead of a private one")
    args = parser.parse_args(argv)
    sizes = [int(size) for size in args.sizes.split(",")]

    with ExitStack() as stack:
        url = args.redis_url or stack.enter_context(RedisServer()).url
        client = connect(url)
        stack.callback(client.close)
        redis_version = client.info("server")["redis_version"]
        results = [
            run_size(client, n, args.requests, args.warmup, args.window, args.seed) for n in sizes
        ]

    print(
        f"{'nodes':>8} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8} {'in Redis':>9} "
        f"{'2xPING p50':>11} {'p50 / PING':>11}"
    )
    for row in results:
        ratio = row["p50_ms"] / row["baseline_p50_ms"]
        print(
            f"{row['nodes']:>8} {row['p50_ms']:>8.3f} {row['p99_ms']:>8.3f} "
            f"{row['mean_ms']:>8.3f} {row['server_ms']:>9.3f} {row['baseline_p50_ms']:>11.3f} "
            f"{ratio:>10.2f}x"
        )
    growth = results[-1]["p99_ms"] / results[0]["p99_ms"]
    print(f"p99 growth {results[0]['nodes']} -> {results[-1]['nodes']} nodes: {growth:.2f}x")
    summary = {
        "benchmark": "router",
        "machine": {
            "processor": platform.processor(),
            "cpu_model": cpu_model(),
            "machine": platform.machine(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "redis": redis_version,
        },
        "requests": args.requests,
        "window": args.window,
        "results": results,
        "p99_growth": growth,
        "target_p99_ms": 2.0,
        "meets_target": results[-1]["p99_ms"] < 2.0,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
