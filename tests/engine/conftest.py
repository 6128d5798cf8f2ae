"""Fixtures for the engine tests: tiny models built once per session, a fresh engine per test.

The device and dtype come from the environment so the same suite runs on a GPU machine:
``EZTINKER_TEST_DEVICE`` (default ``cpu``) and ``EZTINKER_TEST_DTYPE`` (default ``auto``:
float32 on CPU, bfloat16 on CUDA). The hub is never contacted (``HF_HUB_OFFLINE=1``).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from collections.abc import Callable
from pathlib import Path

import pytest
from engine_helpers import DEVICE, DTYPE, TINY_MODELS

from eztinker_tasks import catalog
from eztinker_tasks.engine import Engine, EngineConfig
from eztinker_tasks.engine.tiny import ensure_tiny_model


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data dir with both tiny models (and their tokenizers) built once for the session."""
    directory = tmp_path_factory.mktemp("eztinker-data")
    for name in TINY_MODELS:
        ensure_tiny_model(catalog.BUILTIN_MODELS[name], directory)
    return directory


@pytest.fixture
def checkpoints_dir(tmp_path: Path) -> Path:
    return tmp_path / "checkpoints"


@pytest.fixture
def make_engine(data_dir: Path, checkpoints_dir: Path) -> Callable[..., Engine]:
    """Build an engine on the test device; keyword arguments override EngineConfig fields."""

    def make(**overrides: object) -> Engine:
        settings: dict = {"device": DEVICE, "dtype": DTYPE, **overrides}
        return Engine(EngineConfig(data_dir=data_dir, checkpoints_dir=checkpoints_dir, **settings))

    return make


@pytest.fixture
def engine(make_engine: Callable[..., Engine]) -> Engine:
    return make_engine()


@pytest.fixture(params=TINY_MODELS)
def base_model(request: pytest.FixtureRequest) -> str:
    return request.param
