"""Fixtures of the client tests.

``stub``: a scripted HTTP server (``tests/client/stub.py``) for transport, futures and CLI unit
tests. ``sdk``: a ``ServiceClient`` for the shared real ``service`` (tests/conftest.py).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from eztinker import ServiceClient
from tests.client.stub import StubServer
from tests.conftest import Service


@pytest.fixture()
def stub() -> Iterator[StubServer]:
    server = StubServer()
    yield server
    server.close()


@pytest.fixture()
def sdk(service: Service) -> Iterator[ServiceClient]:
    with ServiceClient(service.base_url) as client:
        yield client
