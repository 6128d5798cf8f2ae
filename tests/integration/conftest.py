"""Fixtures shared by the integration tests (the service itself: tests/conftest.py)."""

from __future__ import annotations

import pytest

from tests.conftest import Service, result_of


@pytest.fixture(scope="module")
def run_id(service: Service) -> str:
    """A ready run (tiny-gpt2, LoRA rank 8) of the shared service, one per test module."""
    with service.http as http:
        created = http.post("/v1/runs", json={"base_model": "tiny-gpt2", "rank": 8})
        result_of(http, created)
        return created.json()["run_id"]
