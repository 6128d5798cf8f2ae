"""The error tree shared by the engine, the tasks and the web layer.

Every error carries a ``category``: ``"user"`` means the request was wrong and retrying it
unchanged cannot help; ``"server"`` means something failed on our side and a retry may work.
This module imports nothing heavy, so the web process can use it without torch.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

Category = Literal["user", "server"]


class EZTinkerError(Exception):
    """Base of every error EZTinker raises on purpose."""

    code: ClassVar[str] = "error"
    status: ClassVar[int] = 500
    category: ClassVar[Category] = "server"

    def __init__(self, message: str, *, errors: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.errors = errors or {}

    def headers(self) -> dict[str, str]:
        """HTTP headers the answer carries besides the envelope."""
        return {}

    def to_dict(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "status": self.status,
            "category": self.category,
            "message": self.message,
            "errors": self.errors,
        }


class InvalidRequest(EZTinkerError):
    """The request is malformed or violates a limit (bad token id, length mismatch, ...)."""

    code = "invalid_request"
    status = 400
    category = "user"


class NonFiniteValue(InvalidRequest):
    """An operation would have produced NaN or inf (a loss, a gradient): nothing was applied.

    The inputs were finite but the arithmetic they lead to overflows (an importance ratio
    exp(lp - logprobs) with an absurd sampler logprob at a weighted position, huge weights,
    ...). The run's weights and accumulated gradient are left exactly as they were.
    """

    code = "non_finite"


class NotFound(EZTinkerError):
    """A run, model, checkpoint or future that does not exist."""

    code = "not_found"
    status = 404
    category = "user"


class UnknownRun(NotFound):
    code = "unknown_run"


class UnknownModel(NotFound):
    code = "unknown_model"


class CheckpointNotFound(NotFound):
    code = "checkpoint_not_found"


class Conflict(EZTinkerError):
    """The request contradicts earlier state (a reused seq_id with another body, ...)."""

    code = "conflict"
    status = 409
    category = "user"


class PayloadTooLarge(EZTinkerError):
    code = "payload_too_large"
    status = 413
    category = "user"


class UnsupportedMediaType(EZTinkerError):
    """A request body that is not JSON."""

    code = "unsupported_media_type"
    status = 415
    category = "user"


class TooManyRequests(EZTinkerError):
    """A tenant is at one of its limits (429): nothing was done. ``Retry-After`` says when to
    try again."""

    code = "too_many_requests"
    status = 429
    category = "user"

    def __init__(
        self, message: str, *, retry_after_s: int = 1, errors: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message, errors=errors)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class TooManyRuns(TooManyRequests):
    """The tenant holds as many runs (not deleted) as it may: delete one; waiting alone
    cannot help, so ``user``."""

    code = "too_many_runs"


class TooManyQueuedOps(TooManyRequests):
    """The tenant has as many unfinished operations as it may: ``server``, since the same
    request succeeds once some of them finish (clients retry it after ``Retry-After``)."""

    code = "too_many_queued_ops"
    category = "server"


class ServiceUnavailable(EZTinkerError):
    """No broker or no live worker: retry later, or start one."""

    code = "service_unavailable"
    status = 503
    category = "server"


class StaleOperation(EZTinkerError):
    """An operation that reached its worker after a later one of the same run was applied.

    Only a message the broker redelivers late can do that (its worker died while running it, so
    it came back after the visibility timeout): it is refused, never applied out of order.
    """

    code = "stale_operation"
    status = 409
    category = "user"


class RunStateLost(EZTinkerError):
    """The worker holding the run restarted and the run's in-memory state is gone."""

    code = "run_state_lost"
    status = 409
    category = "server"


class OperationCrashed(EZTinkerError):
    """An operation was running each of the two times its worker died: it is not run again."""

    code = "op_crashed_worker"
    status = 500
    category = "server"


class RunFailed(EZTinkerError):
    """The run could not be created (its cause is in the message): it will never run anything.

    ``user``: no retry of an operation on this run can help; create a new run instead.
    """

    code = "run_failed"
    status = 409
    category = "user"

    @classmethod
    def of(cls, run_id: str, cause: str | None) -> RunFailed:
        return cls(
            f"run {run_id} could not be created: {cause or 'unknown cause'}; it cannot run "
            "operations (create a new run)",
            errors={"run_id": ["creation failed"]},
        )


class OperationTimeout(EZTinkerError):
    code = "timeout"
    status = 504
    category = "server"


class RequestCancelled(EZTinkerError):
    """The consumer of a streamed sample went away: its generation was ended early."""

    code = "cancelled"
    status = 499
    category = "user"


class InternalError(EZTinkerError):
    code = "internal"
    status = 500
    category = "server"


ERROR_TYPES: dict[str, type[EZTinkerError]] = {
    cls.code: cls
    for cls in (
        EZTinkerError,
        InvalidRequest,
        NonFiniteValue,
        NotFound,
        UnknownRun,
        UnknownModel,
        CheckpointNotFound,
        Conflict,
        PayloadTooLarge,
        TooManyRequests,
        TooManyRuns,
        TooManyQueuedOps,
        ServiceUnavailable,
        StaleOperation,
        RunStateLost,
        OperationCrashed,
        RunFailed,
        OperationTimeout,
        InternalError,
    )
}


def error_from_dict(data: dict[str, Any]) -> EZTinkerError:
    """Rebuild a typed error from its ``to_dict`` form (used across the Celery boundary)."""
    cls = ERROR_TYPES.get(str(data.get("code", "")), InternalError)
    return cls(str(data.get("message", "unknown error")), errors=data.get("errors") or {})


class OperationFailed(Exception):
    """What a Celery task raises when an operation fails.

    Its single argument is the JSON error envelope (``EZTinkerError.to_dict``), so the failure
    crosses the JSON result backend intact and the web layer can report ``category``.
    """

    def __init__(self, envelope: str) -> None:
        super().__init__(envelope)

    @classmethod
    def wrap(cls, error: EZTinkerError) -> OperationFailed:
        import json

        return cls(json.dumps(error.to_dict()))
