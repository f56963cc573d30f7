"""Fuzz tests every `Generation` server shares (the edge server and the gateway); the
random-bytes-on-the-port test and `check_survived` serve the verifier too.

A module that imports them provides the fixtures `server` (a
`tests.processes.ServerProcess`), `channel` (a blocking channel to it), `baseline`
(its RSS in KiB after a warm-up call) and `tally` (a `Tally`); the requests carry
the clients' token.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from protocol.v1 import generation_pb2 as gpb
from tests.fleet import CLIENT_METADATA, is_serving
from tests.fuzz import calls
from tests.fuzz.strategies import (
    EDITS,
    FUZZ,
    RSS_GROWTH_LIMIT_KIB,
    Tally,
    generate_requests,
    mutate,
    send_raw,
)
from tests.processes import ServerProcess

HEALTHY = gpb.GenerateRequest(prompt_tokens=[1, 5, 9], max_tokens=8)


def healthy_generate(channel) -> None:
    code, details = calls.generate(channel, HEALTHY.SerializeToString(), CLIENT_METADATA)
    assert code.name == "OK", details


def test_generated_generate_requests(channel, baseline, tally):
    @FUZZ
    @given(generate_requests())
    def run(request):
        code, details = calls.generate(channel, request.SerializeToString(), CLIENT_METADATA)
        tally.record("Generate (generated)", code, details)

    run()
    healthy_generate(channel)


def test_mutated_generate_requests(channel, baseline, tally):
    @FUZZ
    @given(generate_requests(), EDITS)
    def run(request, edits):
        data = mutate(request.SerializeToString(), edits)
        code, details = calls.generate(channel, data, CLIENT_METADATA)
        tally.record("Generate (mutated)", code, details)

    run()
    healthy_generate(channel)


def test_list_models_with_any_bytes(channel, baseline, tally):
    @FUZZ
    @given(st.binary(max_size=256))
    def run(data):
        code, details = calls.list_models(channel, data, CLIENT_METADATA)
        tally.record("ListModels (random bytes)", code, details)

    run()


def test_random_bytes_to_the_port(server, baseline, tally):
    @FUZZ
    @given(data=st.binary(max_size=2048), preface=st.booleans())
    def run(data, preface):
        send_raw(server.address, data, preface)
        tally.note("raw TCP bytes", "sent")

    run()
    assert is_serving(server.address)


def check_survived(
    name: str, server: ServerProcess, baseline_kib: int, tally: Tally, capsys
) -> None:
    """Alive, SERVING, no traceback in its log, memory within the bound; prints figures."""
    assert server.proc.poll() is None, f"{name} exited with {server.proc.returncode}"
    assert is_serving(server.address)
    growth = server.rss_kib() - baseline_kib
    with capsys.disabled():
        print(f"\n[fuzz] {name}: RSS {baseline_kib} KiB, grew {growth} KiB\n{tally.summary()}")
    assert growth < RSS_GROWTH_LIMIT_KIB, f"{name} RSS grew by {growth} KiB"
    assert "Traceback" not in server.output(), server.output()[-4000:]


def test_server_survived_healthy_and_memory_bounded(server, channel, baseline, tally, capsys):
    healthy_generate(channel)
    check_survived("generation server", server, baseline, tally, capsys)
