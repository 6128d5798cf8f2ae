"""The exceptions the client raises.

Every failure the server reports (an HTTP error or a failed operation) becomes an
``EZTinkerAPIError`` carrying the server's ``code``, HTTP ``status``, ``category`` and
``message``. ``category`` is the server's verdict: ``"user"`` means the request was wrong and
sending it again unchanged cannot help; ``"server"`` means something failed on the service side
and a retry may work. A server that cannot be reached at all raises ``APIConnectionError``
(category ``"server"``).
"""

from __future__ import annotations

from typing import Any, Literal

Category = Literal["user", "server"]

# Error codes of failed operations (futures carry no HTTP status) -> the status they map to.
_CODE_STATUS = {
    "invalid_request": 400,
    "unauthorized": 401,
    "not_found": 404,
    "unknown_run": 404,
    "unknown_model": 404,
    "checkpoint_not_found": 404,
    "conflict": 409,
    "run_state_lost": 409,
    "run_failed": 409,
    "stale_operation": 409,
    "payload_too_large": 413,
    "too_many_requests": 429,
    "too_many_runs": 429,
    "too_many_queued_ops": 429,
    "internal": 500,
    "op_crashed_worker": 500,
    "service_unavailable": 503,
    "worker_gone": 503,
    "revoked": 503,
    "timeout": 504,
}


class EZTinkerError(Exception):
    """Base of every exception raised by the EZTinker client."""


class EZTinkerAPIError(EZTinkerError):
    """The service refused a request or an operation failed.

    ``status`` is the HTTP status (for a failed operation, the status its error code maps to);
    ``future_id`` is set when the error comes from a failed operation's future.
    """

    def __init__(
        self,
        message: str,
        *,
        code: str = "error",
        status: int | None = None,
        category: Category = "server",
        errors: Any = None,
        future_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status
        self.category: Category = category
        self.errors = errors or {}
        self.future_id = future_id

    @property
    def is_user_error(self) -> bool:
        """True when the request itself was wrong (retrying it unchanged cannot help)."""
        return self.category == "user"

    def to_dict(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "status": self.status,
            "category": self.category,
            "message": self.message,
            "errors": self.errors,
            "future_id": self.future_id,
        }

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(code={self.code!r}, status={self.status}, "
            f"category={self.category!r}, message={self.message!r})"
        )


class BadRequestError(EZTinkerAPIError):
    """400 / 422: the request is malformed or violates a limit."""


class AuthenticationError(EZTinkerAPIError):
    """401: a missing or wrong API key."""


class NotFoundError(EZTinkerAPIError):
    """404: an unknown run, model, checkpoint or future."""


class ConflictError(EZTinkerAPIError):
    """409: e.g. a seq_id reused with another body, a run whose worker lost its state, or a
    run whose creation failed."""


class PayloadTooLargeError(EZTinkerAPIError):
    """413: the request body is over the server's limit."""


class RateLimitError(EZTinkerAPIError):
    """429: the caller's tenant is at one of its limits; nothing was done.

    ``code`` says which: ``too_many_queued_ops`` (category ``server``: the client already
    retried it, honouring ``Retry-After``, and its ops are still unfinished) or
    ``too_many_runs`` (category ``user``: delete a run first; not retried). ``retry_after``
    is the server's ``Retry-After`` in seconds, if it sent one.
    """

    retry_after: float | None = None


class InternalServerError(EZTinkerAPIError):
    """500 and other 5xx answers."""


class ServiceUnavailableError(InternalServerError):
    """503: no broker or no live worker."""


class OperationTimeoutError(InternalServerError):
    """504: the operation ran past the server's limit."""


class APIConnectionError(EZTinkerAPIError):
    """The server could not be reached (refused, reset, DNS, timeout)."""


_STATUS_CLASSES: dict[int, type[EZTinkerAPIError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    404: NotFoundError,
    409: ConflictError,
    413: PayloadTooLargeError,
    422: BadRequestError,
    429: RateLimitError,
    503: ServiceUnavailableError,
    504: OperationTimeoutError,
}


def error_class(status: int | None) -> type[EZTinkerAPIError]:
    if status is None:
        return EZTinkerAPIError
    cls = _STATUS_CLASSES.get(status)
    if cls is not None:
        return cls
    return InternalServerError if status >= 500 else BadRequestError


def from_envelope(
    body: Any, status: int | None = None, *, future_id: str | None = None
) -> EZTinkerAPIError:
    """Build the typed error for a server envelope ``{code, status, category, message, errors}``.

    Used for HTTP error bodies (``status`` given) and for a failed future's ``error``.
    """
    env = body if isinstance(body, dict) else {}
    code = str(env.get("code") or "error")
    if status is None:
        raw = env.get("status")
        status = raw if isinstance(raw, int) else _CODE_STATUS.get(code)
    category = env.get("category")
    if category not in ("user", "server"):
        category = "user" if status is not None and status < 500 else "server"
    message = env.get("message") or (
        body if isinstance(body, str) and body else f"HTTP {status} ({code})"
    )
    cls = error_class(status)
    return cls(
        str(message),
        code=code,
        status=status,
        category=category,
        errors=env.get("errors"),
        future_id=future_id,
    )


# Tinker's name for a failed request.
RequestFailedError = EZTinkerAPIError
