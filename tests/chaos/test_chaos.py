"""Each fault of the chaos plan, then all of them at once, under a bounded load on a
real fleet (tests/chaos/harness.py): no request is lost, none outlives its deadline,
and every completed lossless output equals its fault-free output. A phase without
faults comes first: there, and outside every fault's window, nothing may fail."""

from __future__ import annotations

import pytest
import pytest_asyncio

from tests.chaos.harness import FAULTS, ChaosConfig, Fleet
from tests.edge_node.conftest import save_model_pair

PROMPTS = [[1, 5, 9, 22], [3, 7, 11], [2, 40, 41, 42, 43], [8, 8, 13]]
pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fleet(tmp_path_factory):
    root = tmp_path_factory.mktemp("chaos")
    target_dir, draft_dir = save_model_pair(root)
    config = ChaosConfig(
        target_dir=target_dir,
        draft_dir=draft_dir,
        workdir=root,
        concurrency=3,
        max_tokens=24,
        deadline_s=20.0,
        phase_s=7.0,
        inject_at_s=1.5,
        fault_s=2.0,
        heartbeat_ttl_s=3.0,
    )
    f = await Fleet(config).start()
    f.reference_outputs = await f.references(PROMPTS)
    yield f
    await f.stop()


@pytest.mark.parametrize("faults", [[]] + [[fault] for fault in FAULTS] + [list(FAULTS)], ids=str)
async def test_no_request_is_lost(fleet, faults):
    report = await fleet.phase(PROMPTS, faults)
    summary = report.summary(fleet.reference_outputs, fleet.config.deadline_s)
    assert summary["lost"] == 0, summary
    assert summary["hung"] == 0, summary
    assert summary["lossless_identical"], summary
    assert summary["completed"] > 0, summary
    if faults:
        assert summary["recovery_s"] is not None, summary
    else:
        assert summary["failed"] == {}, summary
