"""API keys and the tenants they belong to (read at start-up; stdlib only).

A tenant is a name: every run, checkpoint and future belongs to the tenant whose key created
it, and only that tenant (or an admin) sees it. Keys come from two places, merged:

- ``EZTINKER_API_KEYS``: comma-separated entries, each ``key:tenant`` or a bare ``key``;
- ``EZTINKER_API_KEYS_FILE``: a text file, one ``key tenant`` (or a bare ``key``) per line;
  blank lines and lines starting with ``#`` are skipped.

A bare key belongs to the tenant ``default``: a key list written before tenants existed keeps
working as it did (its keys share one tenant, which also owns the runs recorded before
tenants). Keys of the tenant ``admin`` see every tenant's objects. A key may not be given to
two tenants.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

DEFAULT_TENANT = "default"  # bare keys, auth off, and records written before tenants existed
ADMIN_TENANT = "admin"  # its keys see (and may act on) every tenant's objects

_TENANT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")


@dataclass(frozen=True)
class TenantKey:
    """One API key and the tenant it acts for."""

    key: str
    tenant: str = DEFAULT_TENANT


def _entry(key: str, tenant: str | None) -> TenantKey:
    if not key:
        raise ValueError("an entry has an empty key")
    if any(c.isspace() for c in key) or "," in key:
        raise ValueError("a key may not hold whitespace or commas")
    if tenant is None:
        return TenantKey(key)
    if not _TENANT.match(tenant):
        raise ValueError(
            f"tenant {tenant!r} must be 1-64 letters, digits, '.', '_' or '-' (not first)"
        )
    return TenantKey(key, tenant)


def parse_key_list(raw: str) -> tuple[TenantKey, ...]:
    """``"k1:alice, k2:bob, k3"`` -> keys of alice, bob and (bare k3) the default tenant.

    The tenant follows the last ``:``, so a key itself may not end in ``:<tenant name>``.
    """
    out = []
    for item in raw.split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, tenant = item.rpartition(":")
        out.append(_entry(key.strip(), tenant.strip()) if sep else _entry(item, None))
    return tuple(out)


def parse_key_lines(text: str) -> tuple[TenantKey, ...]:
    """The keys file's lines: ``key tenant`` or a bare ``key``; ``#`` comments, blanks skipped."""
    out = []
    for number, line in enumerate(text.splitlines(), start=1):
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if len(words) > 2:
            raise ValueError(
                f"line {number}: expected 'key tenant' or 'key', got {len(words)} words"
            )
        try:
            out.append(_entry(words[0], words[1] if len(words) == 2 else None))
        except ValueError as exc:
            raise ValueError(f"line {number}: {exc}") from None
    return tuple(out)


def read_key_file(raw: str) -> tuple[TenantKey, ...]:
    """The keys of the file named ``raw`` (``parse_key_lines``); ValueError if unreadable."""
    path = Path(raw)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    keys = parse_key_lines(text)
    if not keys:
        raise ValueError(f"{path} holds no key")
    return keys


def key_tenants(*sources: Iterable[TenantKey]) -> dict[str, str]:
    """One map of key -> tenant from every source; ValueError if a key has two tenants."""
    table: dict[str, str] = {}
    for source in sources:
        for entry in source:
            known = table.setdefault(entry.key, entry.tenant)
            if known != entry.tenant:
                raise ValueError(f"a key is given to two tenants ({known!r} and {entry.tenant!r})")
    return table
