"""A small HTTP/1.1 keep-alive client on the standard library's ``http.client``.

The SDK makes many tiny requests (a submit and a long-poll per operation), so the client's own
cost per request matters: ``http.client`` costs about half a millisecond less per request than
``httpx`` here, which is a tenth of an operation's whole service overhead. What the SDK needs
is small: JSON requests, keep-alive connections shared by threads, streamed downloads, the
usual proxy variables (``HTTP_PROXY``, ``HTTPS_PROXY``, ``NO_PROXY``; loopback never goes through
a proxy), and failures sorted into "never sent" and "may have been received" (which decides
retries).
"""

from __future__ import annotations

import http.client
import json
import select
import socket
import ssl
import threading
from base64 import b64encode
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import unquote, urlencode, urlsplit
from urllib.request import getproxies, proxy_bypass


class NotSentError(Exception):
    """The request never reached the server (connection refused, DNS, connect timeout)."""


class MaybeSentError(Exception):
    """The connection failed after the request was sent, or part of it: it may have arrived."""

    def __init__(self, message: str, *, timeout: bool = False) -> None:
        super().__init__(message)
        self.timeout = timeout


class Response:
    """A response; its body is read already unless it was asked for as a stream."""

    def __init__(self, raw: http.client.HTTPResponse, release: Any) -> None:
        self._raw = raw
        self._release = release  # called with True once the body is fully read
        self.status_code = raw.status
        self.reason_phrase = raw.reason
        self.headers = raw.headers
        self._content: bytes | None = None

    def read(self) -> bytes:
        if self._content is None:
            try:
                self._content = self._raw.read()
            except (OSError, http.client.HTTPException) as exc:
                self._release(False)
                raise MaybeSentError(_describe(exc), timeout=_is_timeout(exc)) from None
            self._release(True)
        return self._content

    def iter_bytes(self, size: int = 1 << 16) -> Iterator[bytes]:
        if self._content is not None:
            yield self._content
            return
        try:
            while chunk := self._raw.read(size):
                yield chunk
        except (OSError, http.client.HTTPException) as exc:
            self._release(False)
            raise MaybeSentError(_describe(exc), timeout=_is_timeout(exc)) from None
        self._content = b""
        self._release(True)

    @property
    def text(self) -> str:
        return self.read().decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.read())

    def close(self) -> None:
        if self._content is None:  # not read to the end: the connection cannot be reused
            self._release(False)


class HTTPClient:
    """Requests to one origin over a pool of keep-alive connections. Thread-safe."""

    def __init__(
        self,
        base_url: str,
        headers: Mapping[str, str],
        *,
        timeout: float,
        connect_timeout: float,
        max_idle: int = 16,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or (443 if self._https else 80)
        self._prefix = parts.path.rstrip("/")
        self._headers = {"Host": parts.netloc, **headers}
        self._origin = f"{parts.scheme}://{parts.netloc}"
        self._proxy = _proxy_for(parts.scheme, self._host)
        if self._proxy is not None and not self._https and self._proxy.auth:
            self._headers["Proxy-Authorization"] = self._proxy.auth
        self.timeout = timeout
        self._connect_timeout = connect_timeout
        self._max_idle = max_idle
        self._lock = threading.Lock()
        self._idle: list[http.client.HTTPConnection] = []
        self._ssl = ssl.create_default_context() if self._https else None

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def send(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        params: Mapping[str, Any] | None = None,
        timeout: float | None = None,
        stream: bool = False,
    ) -> Response:
        """Send one request; raise NotSentError / MaybeSentError on connection failures."""
        url = self._prefix + path
        if self._proxy is not None and not self._https:
            url = self._origin + url  # a plain-HTTP proxy takes the absolute URL
        if params:
            url += "?" + urlencode(params)
        headers = dict(self._headers)
        body = None
        if json_body is not None:
            body = json.dumps(json_body, separators=(",", ":")).encode()
            headers["Content-Type"] = "application/json"
        if method in ("POST", "PUT", "PATCH") or body is not None:
            headers["Content-Length"] = str(len(body or b""))
        conn = self._acquire()
        try:
            sock = conn.sock
            assert sock is not None
            sock.settimeout(timeout if timeout is not None else self.timeout)
            conn.putrequest(method, url, skip_host=True, skip_accept_encoding=True)
            for name, value in headers.items():
                conn.putheader(name, value)
            conn.endheaders(body)
            raw = conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise MaybeSentError(_describe(exc), timeout=_is_timeout(exc)) from None

        def release(reusable: bool) -> None:
            if reusable and not raw.will_close:
                self._release(conn)
            else:
                conn.close()

        response = Response(raw, release)
        if not stream:
            response.read()
        return response

    def _acquire(self) -> http.client.HTTPConnection:
        with self._lock:
            while self._idle:
                conn = self._idle.pop()
                if _usable(conn):
                    return conn
                conn.close()
        host, port = (self._host, self._port)
        if self._proxy is not None:
            host, port = self._proxy.host, self._proxy.port
        conn: http.client.HTTPConnection
        if self._https:
            conn = http.client.HTTPSConnection(
                host, port, timeout=self._connect_timeout, context=self._ssl
            )
            if self._proxy is not None:  # CONNECT through the proxy, then TLS to the server
                extra = {"Proxy-Authorization": self._proxy.auth} if self._proxy.auth else None
                conn.set_tunnel(self._host, self._port, headers=extra)
        else:
            conn = http.client.HTTPConnection(host, port, timeout=self._connect_timeout)
        try:
            conn.connect()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise NotSentError(_describe(exc)) from None
        sock = conn.sock
        assert sock is not None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn

    def _release(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            if len(self._idle) < self._max_idle:
                self._idle.append(conn)
                return
        conn.close()


class _Proxy:
    def __init__(self, url: str) -> None:
        parts = urlsplit(url if "://" in url else "http://" + url)
        if not parts.hostname:
            raise ValueError(f"not a proxy URL: {url!r}")
        self.host = parts.hostname
        self.port = parts.port or 8080
        self.auth = None
        if parts.username:
            user = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            self.auth = "Basic " + b64encode(user.encode()).decode()


def _proxy_for(scheme: str, host: str) -> _Proxy | None:
    """The proxy the environment names for ``scheme`` and ``host``, if any."""
    if host == "localhost" or host.startswith("127.") or host == "::1":
        return None
    url = getproxies().get(scheme)
    if not url or proxy_bypass(host):
        return None
    return _Proxy(url)


def _usable(conn: http.client.HTTPConnection) -> bool:
    """An idle keep-alive connection the server has not closed (nothing to read on it)."""
    sock = conn.sock
    if sock is None:
        return False
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return False
    return not readable


def _is_timeout(exc: BaseException) -> bool:
    return isinstance(exc, TimeoutError)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
