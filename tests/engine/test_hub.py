"""A hub model that cannot be fetched fails at once, not after the hub client's retries.

The probe itself (shared with the web process) is tested in tests/service/test_hub_probe.py;
here, the engine uses it before it loads anything.
"""

from __future__ import annotations

import time

import pytest
from engine_helpers import new_run

from eztinker_tasks.engine import Engine
from eztinker_tasks.errors import UnknownModel


def test_engine_refuses_an_unloadable_hub_model_quickly(engine: Engine) -> None:
    # Offline (as here) the probe refuses it; online the hub answers 404: either way a clear
    # user error well before the hub client's own ~45 s of retries.
    started = time.monotonic()
    with pytest.raises(UnknownModel):
        new_run(engine, "r", base_model="eztinker-test/no-such-model")
    assert time.monotonic() - started < 30
