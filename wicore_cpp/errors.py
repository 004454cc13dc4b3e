"""One exception hierarchy for everything a client can be told; mapped to HTTP in one place.

The HTTP edge turns any `WicoreError` into `{"error": {"message", "type", "param", "code"}}`
with the status below. `code` is the specific OpenAI-style code where one exists
(`model_not_found`, `context_length_exceeded`), otherwise the HTTP status as a string, as the
API document shows.
"""

from __future__ import annotations

# The longest message a client is sent; a backstop behind `excerpt` at each place that echoes
# what the client sent.
MAX_MESSAGE_CHARS = 1000
EXCERPT_CHARS = 64


def excerpt(value: object, limit: int = EXCERPT_CHARS) -> str:
    """A client-sent value as an error message may quote it: repr'd, and cut to `limit`
    characters with the full length said, so an 8,000-character header is never echoed whole."""
    text = repr(value)
    if len(text) <= limit:
        return text
    size = len(value) if isinstance(value, str | bytes) else len(text)
    return f"{text[:limit]}... ({size} characters)"


class WicoreError(Exception):
    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, retry_after: float | None = None):
        super().__init__(message)
        if len(message) > MAX_MESSAGE_CHARS:
            message = message[:MAX_MESSAGE_CHARS] + "..."
        self.message = message
        self.param = param
        self.retry_after = retry_after

    def __reduce__(self):
        # Pickled across the tokenizer helper's process boundary; keep `param` and the rest.
        return (_rebuild, (type(self), self.message, self.param, self.retry_after))

    def to_dict(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code or str(self.status),
            }
        }


class InvalidRequest(WicoreError):
    status = 400
    type = "invalid_request_error"


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class UnsupportedParameter(InvalidRequest):
    """A field OpenAI defines that this server does not honour: refused, never ignored."""

    code = "unsupported_parameter"


class UnsupportedValue(InvalidRequest):
    """A value this server cannot honour, e.g. a JSON-schema keyword it cannot enforce."""

    code = "unsupported_value"


class ModelNotFound(WicoreError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class NotFound(WicoreError):
    status = 404
    type = "invalid_request_error"


class MethodNotAllowed(WicoreError):
    status = 405
    type = "invalid_request_error"


class RateLimited(WicoreError):
    """Too many requests from one client, or the engine is full (queue or concurrency)."""

    status = 429
    type = "rate_limit_exceeded"


class QuotaExceeded(WicoreError):
    """An API key has used up its token quota (OpenAI's `insufficient_quota`); no retry helps."""

    status = 429
    type = "insufficient_quota"
    code = "insufficient_quota"


class InvalidApiKey(WicoreError):
    """No API key, or one that is not known (OpenAI's 401 `invalid_api_key`)."""

    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class PermissionDenied(WicoreError):
    """A valid API key asking for what only admin keys may see."""

    status = 403
    type = "permission_error"
    code = "permission_denied"


class ServiceUnavailable(WicoreError):
    """No worker can take the request: loading, all dead, or the server is draining."""

    status = 503
    type = "server_error"


class ClientTooSlow(WicoreError):
    """The client did not send a request's headers or body within the configured deadline."""

    status = 408
    type = "invalid_request_error"


class RequestTimeout(WicoreError):
    status = 504
    type = "timeout_error"
    code = "timeout"


class GenerationFailed(WicoreError):
    """The request was accepted but could not complete (a worker died mid-stream)."""

    status = 500
    type = "server_error"


def _rebuild(cls: type[WicoreError], message: str, param: str | None,
             retry_after: float | None) -> WicoreError:
    return cls(message, param=param, retry_after=retry_after)


class ModelFileError(Exception):
    """A model file is missing, truncated or not GGUF. Fatal at start-up; never an HTTP error."""
