"""Load: 32 SDK clients at once, mixed operations, and not one op lost, repeated or failed.

The code of ``bench/load.py`` (which runs 32 clients x 200 ops and prints the latency table),
scaled down to 32 x 20 for CI, on the shared stack (one CPU worker holds all 32 runs). Each
client drives its own run through the real ``eztinker`` SDK: forward_backward, optim_step,
sample and save_state in a seeded mix, one after another. Every run's ``step``,
``tokens_trained``, ``last_seq_id`` and checkpoints must be exactly what its client sent, and
each optim_step / save result must carry the step it was sent at.
"""

from __future__ import annotations

from bench.load import OPS, run_load, table
from tests.conftest import Service

CLIENTS = 32
OPS_PER_CLIENT = 20


def test_32_sdk_clients_of_mixed_ops_lose_and_repeat_nothing(service: Service) -> None:
    result = run_load(service.base_url, CLIENTS, OPS_PER_CLIENT, seed=0)
    print("\n" + table(result))
    assert not result.problems, table(result)
    assert len(result.reports) == CLIENTS
    assert len(result.latencies()) == CLIENTS * OPS_PER_CLIENT
    assert all(result.latencies(op) for op in OPS)  # every kind of op ran
    with service.http as http:
        assert http.get("/health").json()["status"] == "ok"
        for report in result.reports:  # each client deleted its run when done
            assert http.get(f"/v1/runs/{report.run_id}").status_code == 404
