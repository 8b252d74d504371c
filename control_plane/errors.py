"""The control plane's exception tree and its one mapping to HTTP.

Domain code raises these; `error_response` turns any of them (and Starlette's own
404/405/413) into the envelope ``{"success": false, "message", "error": {"code"}}``.
Anything else is a bug: `internal_error_response` answers a bare 500 and the caller
logs the traceback server-side.

    AppError
    ├── BadRequest (400 malformed_json)
    │   ├── JsonTooDeep (400 json_too_deep), JsonTooComplex (400 json_too_complex)
    │   ├── InvalidCharacters (400 invalid_characters)
    │   ├── AgentOverride (400 agent_override)
    │   └── NotSignedIn (400 not_signed_in: logout with an API key or the admin token)
    ├── Unauthenticated (401 unauthenticated)
    │   ├── InvalidCredentials (401 invalid_credentials)
    │   └── SignedOut (401 signed_out: a token ended by POST /v1/auth/logout)
    ├── InvalidSignature (401 invalid_signature)
    │   └── TimestampOutOfWindow (401 timestamp_out_of_window, error.details.server_time)
    ├── InsufficientCredits (402 insufficient_credits)
    ├── BudgetExceeded (402 budget_exceeded, error.details)
    ├── Forbidden (403 forbidden)
    │   ├── Revoked (403 revoked), ModelNotAllowed (403 model_not_allowed)
    │   └── WebhookProviderMismatch (403 webhook_provider_mismatch)
    ├── NotFound (404 not_found)
    │   ├── ModelNotFound, ReservationNotFound, SessionNotFound, AgentNotFound
    ├── MethodNotAllowed (405 method_not_allowed)
    ├── Conflict (409 conflict)
    │   ├── IdempotencyConflict (409 idempotency_key_reused)
    │   ├── AvailableCreditsExceeded (409 available_credits_exceeded)
    │   ├── BalanceLimitExceeded (409 balance_limit_exceeded)
    │   └── AgentExists (409 agent_exists)
    ├── PayloadTooLarge (413 payload_too_large)
    │   ├── InputTooLarge (413 input_too_large)
    │   ├── SessionFull (413 session_full)
    │   └── RequestTooLarge (413 request_too_large)
├── ClientClosedRequest (499 client_closed_request: the client left mid-body; never seen)
    ├── ValidationFailed (422 validation_error)
    │   ├── ReservationMismatch (422 reservation_mismatch)
    │   └── UnsupportedFeature (422 unsupported_feature)
    ├── RateLimited (429 rate_limited, Retry-After)
    │   ├── LoginThrottled (429 too_many_login_failures)
    │   ├── TooManyLogins (429 too_many_logins: one account's logins per minute)
    │   ├── TooManyPendingInits (429 too_many_pending_inits)
    │   ├── TpmExceeded (429 tpm_exceeded)
    │   └── TooManyHeavyReads (429 too_many_heavy_reads)
    └── ServiceUnavailable (503 unavailable)
        ├── QueryTimeout (503 query_timeout, Retry-After)
        ├── LoginsBusy (503 logins_busy, Retry-After: every password-check place taken)
        └── DatabaseUnavailable (503 database_unavailable, Retry-After)
"""

from __future__ import annotations

from collections.abc import Mapping

from starlette.exceptions import HTTPException
from starlette.responses import Response

from control_plane.responses import json_response


class AppError(Exception):
    status = 500
    code = "internal_error"
    default_message = "Something went wrong on our side."
    # Machine-readable context, answered as ``error.details`` when set.
    details: dict[str, object] | None = None

    def __init__(self, message: str | None = None, *, headers: Mapping[str, str] | None = None):
        self.message = message or self.default_message
        self.headers = dict(headers or {})
        super().__init__(self.message)


class BadRequest(AppError):
    status, code = 400, "malformed_json"
    default_message = "The request body is not valid JSON."


class JsonTooDeep(BadRequest):
    code = "json_too_deep"
    default_message = "The request body nests arrays and objects too deeply."


class JsonTooComplex(BadRequest):
    code = "json_too_complex"
    default_message = "The request body has too many arrays and objects."


class UnsupportedContent(BadRequest):
    code = "unsupported_content"
    default_message = "The model cannot take this kind of content."


class InvalidCharacters(BadRequest):
    code = "invalid_characters"
    default_message = "The request contains a NUL character (\\u0000), which is not accepted."


class AgentOverride(BadRequest):
    code = "agent_override"
    default_message = "An agent's model, system prompt and tools cannot be changed at init."


class NotSignedIn(BadRequest):
    code = "not_signed_in"
    default_message = "Only a signed-in token (an access token) can sign out."


class Unauthenticated(AppError):
    status, code = 401, "unauthenticated"
    default_message = "Authentication is required: send Authorization: Bearer <token>."

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class InvalidCredentials(Unauthenticated):
    code = "invalid_credentials"
    default_message = "The email or password is wrong."


class SignedOut(Unauthenticated):
    code = "signed_out"
    default_message = "This token was signed out (POST /v1/auth/logout): sign in again."


class InvalidSignature(AppError):
    status, code = 401, "invalid_signature"
    default_message = "The webhook signature does not verify."


class TimestampOutOfWindow(InvalidSignature):
    """Signed with a secret we hold but dated more than 5 minutes off our clock
    (DESIGN §7: 401): the sender's clock disagrees with ours. `server_time` (ours,
    Unix seconds) lets it date its retry by our clock; told only to a holder of the
    secret, since the signature had to verify first."""

    code = "timestamp_out_of_window"
    default_message = "The webhook is signed, but dated more than 5 minutes off our clock."

    def __init__(self, server_time: int) -> None:
        super().__init__()
        self.details = {"server_time": server_time}


class InsufficientCredits(AppError):
    status, code = 402, "insufficient_credits"
    default_message = "Not enough credits available for this request."


class BudgetExceeded(AppError):
    """A hold would cross one of the caller's budgets (DESIGN §11): which one, and
    when its period resets (None for a budget without a period)."""

    status, code = 402, "budget_exceeded"
    default_message = "This request would exceed a spending budget."

    def __init__(self, budget_id: str, scope: str, resets_at: str | None) -> None:
        when = f"; it resets at {resets_at}" if resets_at else ""
        super().__init__(f"This request would exceed the {scope} budget {budget_id}{when}.")
        self.details = {"budget_id": budget_id, "scope": scope, "resets_at": resets_at}


class Forbidden(AppError):
    status, code = 403, "forbidden"
    default_message = "You are not allowed to do this."


class Revoked(Forbidden):
    code = "revoked"
    default_message = "This user or company has been revoked."


class ModelNotAllowed(Forbidden):
    code = "model_not_allowed"
    default_message = "Your company cannot use this model."


class WebhookProviderMismatch(Forbidden):
    code = "webhook_provider_mismatch"
    default_message = "A backend's webhook secret settles only reservations routed to it."


class NotFound(AppError):
    status, code = 404, "not_found"
    default_message = "Not found."


class ModelNotFound(NotFound):
    code = "model_not_found"
    default_message = "No such model."


class ReservationNotFound(NotFound):
    code = "reservation_not_found"
    default_message = "No such reservation."


class SessionNotFound(NotFound):
    code = "session_not_found"
    default_message = "No such chat session."


class AgentNotFound(NotFound):
    code = "agent_not_found"
    default_message = "No such agent."


class MethodNotAllowed(AppError):
    status, code = 405, "method_not_allowed"
    default_message = "This method is not allowed on this path."


class Conflict(AppError):
    status, code = 409, "conflict"
    default_message = "This conflicts with an existing record."


class IdempotencyConflict(Conflict):
    code = "idempotency_key_reused"
    default_message = "This Idempotency-Key was already used with a different request body."


class TurnInProgress(Conflict):
    """`tool_results` for calls the session does not hold yet, while its previous
    turn is still being settled (its transcript arrives with the usage webhook):
    retry shortly."""

    code = "turn_in_progress"
    default_message = "The session's previous turn is still being recorded; retry shortly."

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or self.default_message, headers={"Retry-After": "1"})


class AvailableCreditsExceeded(Conflict):
    code = "available_credits_exceeded"
    default_message = "This would take the company's available credits below zero."


class BalanceLimitExceeded(Conflict):
    code = "balance_limit_exceeded"
    default_message = "This would take the company's balance past the largest one kept."


class AgentExists(Conflict):
    code = "agent_exists"
    default_message = "The company already has an agent of this name."


class LastOwner(Conflict):
    """A company user's change would leave the company with no active owner."""

    code = "last_owner"
    default_message = "This would leave the company without an owner."


class PayloadTooLarge(AppError):
    status, code = 413, "payload_too_large"
    default_message = "The request body is too large."


class InputTooLarge(PayloadTooLarge):
    code = "input_too_large"
    default_message = "The input does not fit the model's context."


class SessionFull(PayloadTooLarge):
    code = "session_full"
    default_message = "This chat session is full; start a new session."


class RequestTooLarge(PayloadTooLarge):
    code = "request_too_large"
    default_message = "The request, with the session's history, is too large to stash."


class ClientClosedRequest(AppError):
    # nginx's code for a client that left before its answer: counted in the metrics,
    # sent to no one.
    status, code = 499, "client_closed_request"
    default_message = "The client closed the connection before its request arrived."


class ValidationFailed(AppError):
    status, code = 422, "validation_error"
    default_message = "The request is invalid."

    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        super().__init__(f"{field}: {problem}")


class ReservationMismatch(AppError):
    status, code = 422, "reservation_mismatch"
    default_message = "The event does not match its reservation."


class ModelNotInChain(ReservationMismatch):
    """A usage event names a served model outside the reservation's fallback chain."""

    code = "model_not_in_chain"
    default_message = "The served model is not in this reservation's fallback chain."


class UnsupportedFeature(AppError):
    status, code = 422, "unsupported_feature"
    default_message = "The model does not support a feature this request needs."


class RateLimited(AppError):
    status, code = 429, "rate_limited"
    default_message = "Too many requests; retry later."

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after)})
        self.retry_after = retry_after


class LoginThrottled(RateLimited):
    code = "too_many_login_failures"


class TooManyLogins(RateLimited):
    """An account's logins (right password or not) past their per-minute limit
    (`login_limits`)."""

    code = "too_many_logins"


class TooManyPendingInits(RateLimited):
    code = "too_many_pending_inits"


class TpmExceeded(RateLimited):
    code = "tpm_exceeded"


class TooManyHeavyReads(RateLimited):
    """A company's share of the console's aggregates and audit searches is taken
    (`heavy_reads`)."""

    code = "too_many_heavy_reads"


class ServiceUnavailable(AppError):
    status, code = 503, "unavailable"
    default_message = "The service is temporarily unavailable; retry shortly."


class QueryTimeout(ServiceUnavailable):
    """A heavy read ran past its statement timeout and was cancelled (`heavy_reads`)."""

    code = "query_timeout"
    default_message = "The query took too long and was stopped; retry later."

    def __init__(self, message: str | None = None, *, retry_after: int) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after)})


class LoginsBusy(ServiceUnavailable):
    """Every place for a password check in this process is taken (`password_checks`)."""

    code = "logins_busy"
    default_message = "Too many passwords are being checked right now; retry shortly."

    def __init__(self, retry_after: int) -> None:
        super().__init__(headers={"Retry-After": str(retry_after)})


class StoreUnavailable(ServiceUnavailable):
    """The store (Redis) did not answer: the counters, limits and single-use marks
    live there, so the request is refused rather than served unchecked. The edge's
    code for the same (`store_unavailable`); a retry is the answer."""

    code = "store_unavailable"
    default_message = "The request store is unavailable; retry shortly."

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message, headers={"Retry-After": "1"})


class DatabaseUnavailable(ServiceUnavailable):
    """The database could not run the request: unreachable (a restart, a failover),
    or a statement it gave up on (a deadlock), or no answer within the time limit
    (then the work may still commit later: `db_threads`). A retry is the answer, as
    for a store outage (`app._database_error`)."""

    code = "database_unavailable"
    default_message = "The gateway's database is unavailable; retry shortly."

    def __init__(self) -> None:
        super().__init__(headers={"Retry-After": "1"})


_HTTP_STATUS: dict[int, type[AppError]] = {
    400: BadRequest,
    404: NotFound,
    405: MethodNotAllowed,
    413: PayloadTooLarge,
}


def error_body(
    message: str, code: str, details: dict[str, object] | None = None
) -> dict[str, object]:
    error: dict[str, object] = {"code": code}
    if details is not None:
        error["details"] = details
    return {"success": False, "message": message, "error": error}


def error_response(exc: AppError) -> Response:
    return json_response(error_body(exc.message, exc.code, exc.details), exc.status, exc.headers)


def from_http_exception(exc: HTTPException) -> AppError:
    """Starlette's routing errors (unknown path, wrong method) as ours."""
    kind = _HTTP_STATUS.get(exc.status_code)
    if kind is None:
        error = AppError()
        error.status = exc.status_code
        error.code = "http_error"
        error.message = str(exc.detail)
    else:
        error = kind()
    if exc.headers:
        error.headers.update(exc.headers)
    return error


def internal_error_response() -> Response:
    return error_response(AppError())
