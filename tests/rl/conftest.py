"""Fixtures of the RL tests: an SDK client for the shared real ``service`` (tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from eztinker import ServiceClient
from tests.conftest import Service


@pytest.fixture()
def sdk(service: Service) -> Iterator[ServiceClient]:
    with ServiceClient(service.base_url) as client:
        yield client
