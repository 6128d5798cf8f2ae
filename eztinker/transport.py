"""HTTP to the EZTinker API: one keep-alive connection pool, bounded retries, typed errors.

Which failures are retried (with exponential backoff and jitter, honouring ``Retry-After``):

- the request never reached the server (connection refused, DNS, connect timeout): always;
- 429 and 503 (the server did nothing): always, but for a 429 of category ``user`` (a limit
  only the caller can lift, such as its tenant's run limit: waiting cannot help);
- a connection dropped after sending, a read timeout, or another 5xx: only for requests that
  are safe to repeat (``idempotent``): GETs, sampling, and training operations that carry a
  ``seq_id`` (the server answers a resent seq_id with the original future, so a retried
  operation is never applied twice).

Every error body is the server's envelope ``{code, status, category, message, errors}`` and
becomes an ``EZTinkerAPIError`` subclass (``eztinker.errors``).
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Collection, Generator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from eztinker.errors import APIConnectionError, EZTinkerAPIError, RateLimitError, from_envelope
from eztinker.http_client import HTTPClient, MaybeSentError, NotSentError, Response

log = logging.getLogger("eztinker")

DEFAULT_BASE_URL = "http://localhost:8000"
USER_AGENT = "eztinker-python/0.1"

_ALWAYS_RETRY_STATUS = frozenset({429, 503})
_IDEMPOTENT_RETRY_STATUS = frozenset({500, 502, 504})


def resolve_base_url(base_url: str | None = None) -> str:
    """``base_url``, else ``EZTINKER_BASE_URL``, else ``http://localhost:8000``."""
    url = base_url or os.environ.get("EZTINKER_BASE_URL") or DEFAULT_BASE_URL
    if "://" not in url:
        url = "http://" + url
    return url.rstrip("/")


def resolve_api_key(api_key: str | None = None) -> str | None:
    return api_key or os.environ.get("EZTINKER_API_KEY") or None


@dataclass(frozen=True)
class RetryPolicy:
    """Up to ``max_retries`` retries, waiting ``initial_delay * multiplier**n`` (capped)."""

    max_retries: int = 6
    initial_delay: float = 0.5
    max_delay: float = 10.0
    multiplier: float = 2.0
    jitter: float = 0.2

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        base = min(self.max_delay, self.initial_delay * self.multiplier**attempt)
        if retry_after is not None:
            base = min(self.max_delay, max(base, retry_after))
        return base * (1 + self.jitter * random.random())


def _retry_after(response: Response) -> float | None:
    value = response.headers.get("Retry-After")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _waiting_cannot_help(response: Response) -> bool:
    """A 429 the server marks ``user``: a limit the caller lifts (delete a run), not waits out."""
    if response.status_code != 429:
        return False
    try:
        body = response.json()
    except ValueError:
        return False
    return isinstance(body, dict) and body.get("category") == "user"


class Transport:
    """Sends requests to one EZTinker server. Thread-safe (one shared connection pool)."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 60.0,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.base_url = resolve_base_url(base_url)
        self.api_key = resolve_api_key(api_key)
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        headers = {"User-Agent": USER_AGENT, "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        self._client = HTTPClient(
            self.base_url, headers, timeout=timeout, connect_timeout=min(timeout, 10.0)
        )

    def close(self) -> None:
        self._client.close()

    def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, Any] | None = None,
        idempotent: bool | None = None,
        timeout: float | None = None,
        accept: Collection[int] = (),
    ) -> Any:
        """Send a request and return its decoded JSON body; raise ``EZTinkerAPIError``.

        ``accept``: error statuses whose body is returned instead of raised (not retried).
        """
        with self._send(method, path, json=json, params=params, idempotent=idempotent,
                        timeout=timeout, accept=accept) as response:  # fmt: skip
            if not response.read():
                return None
            try:
                return response.json()
            except ValueError:
                return response.text

    @contextmanager
    def stream(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        timeout: float | None = None,
    ) -> Generator[Response]:
        """A successful streamed response (for downloads); errors are raised as usual."""
        with self._send(
            method, path, params=params, idempotent=True, timeout=timeout, stream=True
        ) as response:
            yield response

    @contextmanager
    def _send(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, Any] | None = None,
        idempotent: bool | None = None,
        timeout: float | None = None,
        stream: bool = False,
        accept: Collection[int] = (),
    ) -> Generator[Response]:
        method = method.upper()
        if idempotent is None:
            idempotent = method in ("GET", "HEAD", "OPTIONS", "PUT")
        attempt = 0
        while True:
            try:
                response = self._client.send(
                    method, path, json_body=json, params=params, timeout=timeout,
                    stream=stream,
                )  # fmt: skip
                if stream and response.status_code >= 400:
                    response.read()
            except (NotSentError, MaybeSentError) as exc:
                retryable = isinstance(exc, NotSentError) or idempotent
                if retryable and attempt < self.retry.max_retries:
                    self._sleep(attempt, method, path, str(exc))
                    attempt += 1
                    continue
                raise self._connection_error(exc, method, path) from None
            if response.status_code < 300 or response.status_code in accept:
                try:
                    yield response
                finally:
                    response.close()
                return
            retryable = (
                response.status_code in _ALWAYS_RETRY_STATUS and not _waiting_cannot_help(response)
            ) or (idempotent and response.status_code in _IDEMPOTENT_RETRY_STATUS)
            if retryable and attempt < self.retry.max_retries:
                self._sleep(attempt, method, path, f"HTTP {response.status_code}",
                            _retry_after(response))  # fmt: skip
                attempt += 1
                continue
            raise self._http_error(response)

    def _sleep(
        self, attempt: int, method: str, path: str, why: str, retry_after: float | None = None
    ) -> None:
        delay = self.retry.delay(attempt, retry_after)
        log.info("%s %s failed (%s); retry %d in %.2f s", method, path, why, attempt + 1, delay)
        time.sleep(delay)

    def _connection_error(
        self, exc: NotSentError | MaybeSentError, method: str, path: str
    ) -> Exception:
        if isinstance(exc, MaybeSentError) and exc.timeout:
            message = f"{method} {self.base_url}{path} timed out ({exc})"
            code = "timeout"
        elif isinstance(exc, NotSentError):
            message = (
                f"cannot reach the EZTinker server at {self.base_url} ({exc}); is it running? "
                "Set EZTINKER_BASE_URL or --base-url"
            )
            code = "connection_error"
        else:
            message = f"connection to {self.base_url} failed during {method} {path} ({exc})"
            code = "connection_error"
        return APIConnectionError(message, code=code, category="server")

    @staticmethod
    def _http_error(response: Response) -> EZTinkerAPIError:
        if 300 <= response.status_code < 400:
            where = response.headers.get("Location") or "elsewhere"
            message = (
                f"the server answered with a redirect (HTTP {response.status_code}) to {where}; "
                "is the base URL the EZTinker API's own address?"
            )
            body: Any = {"code": "redirect", "category": "user", "message": message}
            return from_envelope(body, response.status_code)
        try:
            body = response.json()
        except ValueError:
            body = response.text.strip()[:500] or response.reason_phrase
        error = from_envelope(body, response.status_code)
        if isinstance(error, RateLimitError):
            error.retry_after = _retry_after(response)
        return error
