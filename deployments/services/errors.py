"""Errors that reach a client as `{"error": {"code", "message", "request_id"}}`: user mistakes as 4xx with what
to fix, a full queue or a missing backend as 503 with Retry-After, never a 500 for something the caller did."""

from __future__ import annotations


class ServiceError(Exception):
    """A refusal with an HTTP status, a stable code and a message for a person. Raised anywhere in a service,
    it crosses Ray (all fields are constructor arguments, so it pickles) and the gateway answers with it."""

    def __init__(self, status: int, code: str, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(status, code, message, retry_after_s)
        self.status, self.code, self.message, self.retry_after_s = status, code, message, retry_after_s

    def __str__(self) -> str:
        return f"{self.status} {self.code}: {self.message}"


def bad_request(code: str, message: str) -> ServiceError:
    return ServiceError(400, code, message)


def not_found(what: str, ident: object) -> ServiceError:
    return ServiceError(404, "not_found", f"no {what} with id {ident}")


def unavailable(code: str, message: str, retry_after_s: float = 5.0) -> ServiceError:
    return ServiceError(503, code, message, retry_after_s)


def unwrap(exc: BaseException) -> BaseException:
    """The user's exception inside a Ray task error (Ray re-raises remote errors wrapped, with `.cause`)."""
    seen = 0
    while seen < 5 and getattr(exc, "cause", None) is not None and isinstance(exc.cause, BaseException):
        exc = exc.cause
        seen += 1
    return exc
