"""What a request handler may use: settings, the Redis store, Celery (to send), tokenizers.

Built once per app by ``create_app`` and reached through ``services()``. The Redis URL is
resolved lazily, so the web process can start before the embedded broker is up; until then
requests that need it answer 503.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import redis
from celery import Celery
from flask import current_app

from config import Settings
from eztinker_tasks.broker import resolve_redis_url
from eztinker_tasks.celery_app import make_celery
from eztinker_tasks.errors import ServiceUnavailable
from eztinker_tasks.store import Store
from eztinker_tasks.tokenization import TokenizerCache
from eztinker_web.futures.watcher import ResultWatcher
from eztinker_web.targets import TargetCache


@dataclass
class Services:
    settings: Settings
    tokenizers: TokenizerCache
    run_targets: TargetCache = field(default_factory=TargetCache)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _celery: Celery | None = None
    _store: Store | None = None
    _redis: redis.Redis | None = None
    _watcher: ResultWatcher | None = None
    _closing: bool = False

    def _connect(self) -> None:
        with self._lock:
            if self._store is not None:
                return
            url = resolve_redis_url(self.settings)
            self._redis = redis.Redis.from_url(url, socket_timeout=10, health_check_interval=30)
            self._celery = make_celery(self.settings, url)
            self._store = Store(self._redis, self.settings.result_ttl_s)
            self._watcher = ResultWatcher(self._redis)
            if self._closing:
                self._watcher.close()

    @property
    def store(self) -> Store:
        self._connect()
        assert self._store is not None
        return self._store

    @property
    def celery(self) -> Celery:
        self._connect()
        assert self._celery is not None
        return self._celery

    @property
    def watcher(self) -> ResultWatcher:
        self._connect()
        assert self._watcher is not None
        return self._watcher

    @property
    def closing(self) -> bool:
        """The process is stopping (``close_long_polls`` was called): waits end now."""
        return self._closing

    def close_long_polls(self) -> None:
        """The process is stopping: long-polls answer now (see ``gunicorn_hooks``)."""
        with self._lock:
            self._closing = True
            watcher = self._watcher
        if watcher is not None:
            watcher.close()

    @property
    def redis_client(self) -> redis.Redis:
        self._connect()
        assert self._redis is not None
        return self._redis

    def ping(self) -> None:
        try:
            self.redis_client.ping()
        except redis.RedisError as exc:
            raise ServiceUnavailable(f"broker unreachable: {exc}") from None


def services() -> Services:
    return current_app.extensions["eztinker"]
