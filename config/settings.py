"""One typed settings object for every EZTinker process, read from the environment.

Each field has a default and a help text; ``Settings.from_env()`` parses ``EZTINKER_*`` variables
(plus the seed's ``CHECKPOINTS_DIR``) and fails at start-up with a message that names the
variable when a value is invalid. Nothing else in the code base reads ``os.environ`` for
configuration.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from config.tenants import TenantKey, key_tenants, parse_key_list, read_key_file


class SettingsError(ValueError):
    """An environment variable holds a value EZTinker cannot use."""


def _setting(env: str, default: Any, help: str) -> Any:
    return field(default=default, metadata={"env": env, "help": help})


@dataclass(frozen=True)
class Settings:
    redis_url: str | None = _setting(
        "EZTINKER_REDIS_URL",
        None,
        "Redis URL for broker and results; unset = start/use the embedded broker in the data dir.",
    )
    checkpoints_dir: Path = _setting(  # noqa: RUF009 - Path is immutable
        "CHECKPOINTS_DIR", Path("checkpoints"), "Where checkpoints are written (<run_id>/<name>/)."
    )
    data_dir: Path = _setting(  # noqa: RUF009 - Path is immutable
        "EZTINKER_DATA_DIR", Path(".eztinker"), "Model cache and embedded broker data."
    )
    base_url: str = _setting(
        "EZTINKER_BASE_URL", "http://localhost:8000", "Where clients reach the API."
    )
    default_model: str = _setting(
        "EZTINKER_DEFAULT_MODEL", "tiny-gpt2", "Base model for requests that name none."
    )
    host: str = _setting("EZTINKER_HOST", "localhost", "Interface the web server binds.")
    port: int = _setting("EZTINKER_PORT", 8000, "Port the web server listens on.")
    device: str = _setting(
        "EZTINKER_DEVICE", "auto", "Worker device: auto (cuda if present), cpu, cuda, cuda:N."
    )
    dtype: str = _setting(
        "EZTINKER_DTYPE", "auto", "Base model dtype: auto (bf16 on CUDA, fp32 on CPU), float32, ..."
    )
    api_keys: tuple[TenantKey, ...] = _setting(
        "EZTINKER_API_KEYS",
        (),
        "Comma-separated API keys, each 'key:tenant' or a bare 'key' (tenant 'default'); "
        "tenant 'admin' sees every tenant. Empty (and no keys file) = auth off.",
    )
    api_keys_file: tuple[TenantKey, ...] = _setting(
        "EZTINKER_API_KEYS_FILE",
        (),
        "A file of API keys, one 'key tenant' (or a bare 'key') per line, '#' comments; "
        "read at start-up, merged with EZTINKER_API_KEYS.",
    )
    model_dirs: tuple[Path, ...] = _setting(
        "EZTINKER_MODEL_DIRS",
        (),
        "With API keys on: the directories (':'-separated) under which a tenant other than "
        "admin may name a local model directory as a base; empty = none. Admin keys, and "
        "everyone when auth is off, may name any directory the server can read.",
    )
    tenant_max_runs: int = _setting(
        "EZTINKER_TENANT_MAX_RUNS",
        0,
        "Most runs (not deleted) a tenant may hold; more answer 429 (0 = unlimited).",
    )
    tenant_max_queued_ops: int = _setting(
        "EZTINKER_TENANT_MAX_QUEUED_OPS",
        0,
        "Most unfinished operations (training ops, samples, logprobs) a tenant may have "
        "queued or running; more answer 429 (0 = unlimited).",
    )
    max_request_bytes: int = _setting(
        "EZTINKER_MAX_REQUEST_BYTES", 64 * 1024 * 1024, "Largest request body (413 above)."
    )
    max_datums: int = _setting(
        "EZTINKER_MAX_DATUMS", 4096, "Most datums in one forward_backward / forward."
    )
    max_samples: int = _setting("EZTINKER_MAX_SAMPLES", 256, "Most num_samples in one sample.")
    max_sample_tokens: int = _setting(
        "EZTINKER_MAX_SAMPLE_TOKENS", 8192, "Most new tokens in one sample."
    )
    op_timeout_s: float = _setting(
        "EZTINKER_OP_TIMEOUT_S", 1800.0, "Longest a single operation may run before it fails."
    )
    result_ttl_s: int = _setting(
        "EZTINKER_RESULT_TTL_S", 24 * 3600, "How long futures and their results are kept."
    )
    worker_heartbeat_s: float = _setting(
        "EZTINKER_WORKER_HEARTBEAT_S", 2.0, "How often a worker reports that it is alive."
    )
    worker_ttl_s: float = _setting(
        "EZTINKER_WORKER_TTL_S", 15.0, "A worker silent this long counts as gone."
    )
    min_free_bytes: int = _setting(
        "EZTINKER_MIN_FREE_BYTES",
        512 * 1024 * 1024,
        "A worker with less free (GPU or host) memory gets no new runs.",
    )
    coalesce_max_ops: int = _setting(
        "EZTINKER_COALESCE_MAX_OPS",
        32,
        "Most queued forward/forward_backward calls of a run merged into one pass (1 = off).",
    )
    coalesce_max_tokens: int = _setting(
        "EZTINKER_COALESCE_MAX_TOKENS",
        16384,
        "Most tokens the calls merged into one pass may add to it.",
    )
    cross_run_batching: bool = _setting(
        "EZTINKER_CROSS_RUN_BATCHING",
        True,
        "Queued calls of a worker's other runs on the same base join a starting pass (1/0).",
    )
    sample_batch_max: int = _setting(
        "EZTINKER_SAMPLE_BATCH_MAX",
        64,
        "Most sample requests decoded in one batch with a starting one (1 = off).",
    )
    activation_checkpointing: str = _setting(
        "EZTINKER_ACTIVATION_CHECKPOINTING",
        "auto",
        "Recompute activations in the backward: auto (when a pass would not fit), always, never.",
    )
    recovery: bool = _setting(
        "EZTINKER_RECOVERY",
        True,
        "Runs recover by themselves when a worker dies: snapshots + a log of later ops (1/0).",
    )
    snapshot_interval_s: float = _setting(
        "EZTINKER_SNAPSHOT_INTERVAL_S",
        10.0,
        "Snapshot a run at its first optim_step this long after its last one (0 = each step).",
    )
    snapshot_every_steps: int = _setting(
        "EZTINKER_SNAPSHOT_EVERY_STEPS",
        20,
        "Also snapshot a run once this many optim_steps passed since its last snapshot (0 = no).",
    )
    rehome_after_s: float = _setting(
        "EZTINKER_REHOME_AFTER_S",
        20.0,
        "A run whose worker is gone (and not restarting) this long moves to another live worker.",
    )
    broker_bind: tuple[str, ...] = _setting(
        "EZTINKER_BROKER_BIND",
        (),
        "More addresses the embedded broker listens on besides 127.0.0.1, comma-separated IPs "
        "(this host's LAN address, or 0.0.0.0): for workers on other hosts. It always asks "
        "for its password; empty = loopback only.",
    )
    sampler_snapshots_kept: int = _setting(
        "EZTINKER_SAMPLER_SNAPSHOTS_KEPT",
        8,
        "Most unnamed sampler snapshots (save_weights_and_get_sampling_client) kept per run; "
        "older ones are deleted when a new one is saved.",
    )
    flower_port: int = _setting("EZTINKER_FLOWER_PORT", 5555, "Port of the Flower UI.")
    web_workers: int = _setting(
        "EZTINKER_WEB_WORKERS",
        0,
        "gunicorn processes of the web API (0 = auto: half the CPU cores, 2 to 4).",
    )
    access_log: bool = _setting(
        "EZTINKER_ACCESS_LOG",
        False,
        "Log every HTTP request (1/true); off by default: two lines per op at hundreds of ops/s.",
    )

    def __post_init__(self) -> None:
        try:
            self.key_tenants()
        except ValueError as exc:
            raise SettingsError(f"EZTINKER_API_KEYS / EZTINKER_API_KEYS_FILE: {exc}") from None

    def key_tenants(self) -> dict[str, str]:
        """Every API key -> its tenant (both sources); empty when auth is off."""
        return key_tenants(self.api_keys, self.api_keys_file)

    def web_processes(self) -> int:
        """How many web processes to run: the setting, or half the cores (2 to 4)."""
        if self.web_workers > 0:
            return self.web_workers
        return min(4, max(2, (os.cpu_count() or 2) // 2))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from ``environ`` (default ``os.environ``); raise SettingsError."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            env = f.metadata["env"]
            raw = environ.get(env)
            if raw is None or raw == "":
                continue
            parser = _PARSERS[f.name]
            try:
                values[f.name] = parser(raw)
            except (TypeError, ValueError) as exc:
                raise SettingsError(f"{env}={raw!r} is invalid: {exc}") from None
        values.update(overrides)
        return cls(**values)

    def with_(self, **changes: Any) -> Settings:
        return replace(self, **changes)

    @classmethod
    def describe(cls) -> list[tuple[str, str, str]]:
        """(variable, default, help) for every setting: for docs and ``--help``."""
        return [(f.metadata["env"], repr(f.default), f.metadata["help"]) for f in fields(cls)]


def _non_negative_int(raw: str) -> int:
    value = int(raw)
    if value < 0:
        raise ValueError("must be 0 or a positive integer")
    return value


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value <= 0:
        raise ValueError("must be a positive integer")
    return value


def _port(raw: str) -> int:
    value = int(raw)
    if not 0 < value < 65536:
        raise ValueError("must be a port number between 1 and 65535")
    return value


def _positive_float(raw: str) -> float:
    value = float(raw)
    if not value > 0 or value == float("inf"):
        raise ValueError("must be a positive finite number")
    return value


def _non_negative_float(raw: str) -> float:
    value = float(raw)
    if not value >= 0 or value == float("inf"):
        raise ValueError("must be 0 or a positive finite number")
    return value


def _redis_url(raw: str) -> str:
    parsed = urlparse(raw)
    if parsed.scheme not in ("redis", "rediss", "unix"):
        raise ValueError("must be a redis://, rediss:// or unix:// URL")
    return raw


def _http_url(raw: str) -> str:
    parsed = urlparse(raw)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValueError("must be an http(s):// URL")
    return raw.rstrip("/")


def _device(raw: str) -> str:
    if raw in ("auto", "cpu", "cuda") or (raw.startswith("cuda:") and raw[5:].isdigit()):
        return raw
    raise ValueError("must be auto, cpu, cuda or cuda:N")


def _dtype(raw: str) -> str:
    if raw in ("auto", "float32", "bfloat16", "float16"):
        return raw
    raise ValueError("must be auto, float32, bfloat16 or float16")


def _checkpointing(raw: str) -> str:
    if raw in ("auto", "always", "never"):
        return raw
    raise ValueError("must be auto, always or never")


_HOST = re.compile(
    r"^(\[[0-9A-Fa-f:.]+\]|[0-9A-Fa-f:]*:[0-9A-Fa-f:.]*|[A-Za-z0-9][A-Za-z0-9.\-]*)$"
)


def _model(raw: str) -> str:
    """A built-in model name, a Hugging Face model id or an existing local model directory."""
    from eztinker_tasks import catalog  # the one rule for names (torch-free, stdlib only)

    name = raw.strip()
    if catalog.is_hub_id(name) or Path(name).is_dir():  # built-in names are hub-id shaped
        return name
    builtins = ", ".join(sorted(catalog.BUILTIN_MODELS))
    raise ValueError(
        f"must be a built-in model name ({builtins}), a Hugging Face model id (org/name) or "
        "an existing model directory"
    )


def _flag(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("must be 1/true/yes/on or 0/false/no/off")


def _host(raw: str) -> str:
    host = raw.strip()
    if _HOST.match(host):
        return host
    raise ValueError("must be a host name or an IP address (like localhost or 0.0.0.0)")


def _addresses(raw: str) -> tuple[str, ...]:
    out = []
    for part in re.split(r"[,\s]+", raw.strip()):
        if part:
            out.append(str(ipaddress.ip_address(part)))  # ValueError names the bad one
    return tuple(out)


def _directories(raw: str) -> tuple[Path, ...]:
    return tuple(Path(part).expanduser().resolve() for part in raw.split(os.pathsep) if part)


_PARSERS: dict[str, Callable[[str], Any]] = {
    "redis_url": _redis_url,
    "checkpoints_dir": Path,
    "data_dir": Path,
    "base_url": _http_url,
    "default_model": _model,
    "host": _host,
    "port": _port,
    "device": _device,
    "dtype": _dtype,
    "api_keys": parse_key_list,
    "api_keys_file": read_key_file,
    "model_dirs": _directories,
    "tenant_max_runs": _non_negative_int,
    "tenant_max_queued_ops": _non_negative_int,
    "max_request_bytes": _positive_int,
    "max_datums": _positive_int,
    "max_samples": _positive_int,
    "max_sample_tokens": _positive_int,
    "op_timeout_s": _positive_float,
    "result_ttl_s": _positive_int,
    "worker_heartbeat_s": _positive_float,
    "worker_ttl_s": _positive_float,
    "min_free_bytes": _positive_int,
    "coalesce_max_ops": _positive_int,
    "sample_batch_max": _positive_int,
    "coalesce_max_tokens": _positive_int,
    "cross_run_batching": _flag,
    "activation_checkpointing": _checkpointing,
    "recovery": _flag,
    "snapshot_interval_s": _non_negative_float,
    "snapshot_every_steps": _non_negative_int,
    "rehome_after_s": _non_negative_float,
    "broker_bind": _addresses,
    "sampler_snapshots_kept": _positive_int,
    "flower_port": _port,
    "web_workers": _non_negative_int,
    "access_log": _flag,
}
