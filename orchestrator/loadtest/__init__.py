"""`edgecloud loadtest`: load a `Generation` server through the SDK and measure it the way
`vllm bench serve` does (TTFT, TPOT, ITL, E2EL, throughput, goodput), plus what only this
system has: the inter-chunk latency (one chunk per verified round) and the speculative
decoding figures (rounds, acceptance, cloud passes per token).

records: per-request records and metric definitions; runner: closed and open loops on
`edgecloud.AsyncClient`; prompts: prompt files and the held-out corpus; report: tables,
JSON, plots and the progress bar. The fleet emulator (`--emulate-edges`): recording (a
real edge's streams at the wire), draft_book (the real draft's trees of every shape at
every position of a greedy generation) and fleet (emulated edges replaying or drafting
from them). The CLI wiring is `orchestrator.commands.loadtest`.
"""

from orchestrator.loadtest.records import RequestRecord, Slo, Summary, percentile, summarize
from orchestrator.loadtest.runner import (
    CredentialsRefused,
    LoadPlan,
    LoadResult,
    arrival_offsets,
    run_load,
)

__all__ = [
    "CredentialsRefused",
    "LoadPlan",
    "LoadResult",
    "RequestRecord",
    "Slo",
    "Summary",
    "arrival_offsets",
    "percentile",
    "run_load",
    "summarize",
]
