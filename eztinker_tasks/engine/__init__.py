"""The training and sampling engine: LoRA adapters on shared base models (torch side).

Import ``Engine`` and ``EngineConfig`` from here; the contract is docs/ENGINE_SPEC.md and
``Backend`` is that contract as a Protocol. This package imports torch, transformers and peft,
and never celery, flask or redis.
"""

from eztinker_tasks.engine.backend import Backend
from eztinker_tasks.engine.config import EngineConfig
from eztinker_tasks.engine.engine import Engine

__all__ = ["Backend", "Engine", "EngineConfig"]
