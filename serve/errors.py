"""Errors of the serving layer, each carrying the HTTP status and OpenAI error type the gateway answers with."""

from __future__ import annotations

import math
from typing import Any

from slipway.errors import SlipwayError


class ServeError(SlipwayError):
    """Root of serving errors. ``status``/``type``/``code`` shape the OpenAI error body."""

    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None, headers=None) -> None:
        super().__init__(message)
        self.param = param
        if code is not None:
            self.code = code
        self.headers: dict[str, str] = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": str(self), "type": self.type, "param": self.param, "code": self.code}}


class BadRequest(ServeError):
    status, type, code = 400, "invalid_request_error", "invalid_request"


class Unauthorized(ServeError):
    status, type, code = 401, "authentication_error", "invalid_api_key"


class Forbidden(ServeError):
    status, type, code = 403, "permission_error", "model_not_allowed"


class ModelNotFound(ServeError):
    status, type, code = 404, "invalid_request_error", "model_not_found"


class PromptTooLong(ServeError):
    status, type, code = 413, "invalid_request_error", "context_length_exceeded"


class RateLimited(ServeError):
    status, type, code = 429, "rate_limit_error", "rate_limit_exceeded"


class UpstreamRateLimited(RateLimited):
    """A provider's own 429; ``retry_after`` is the seconds its Retry-After asked for (passed to the client)."""

    code = "upstream_rate_limited"

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        headers = {"retry-after": str(max(1, math.ceil(retry_after)))} if retry_after is not None else {}
        super().__init__(message, headers=headers)
        self.retry_after = retry_after


class UpstreamFailed(ServeError):
    """A provider that failed (5xx, refused slipway's credentials, a cut stream): the gateway's upstream, not the
    gateway, is at fault."""

    status, type, code = 502, "server_error", "upstream_error"


class Overloaded(ServeError):
    status, type, code = 503, "server_error", "overloaded"


class UpstreamTimeout(ServeError):
    status, type, code = 504, "server_error", "timeout"


class ControlError(ServeError):
    """A control-plane request that cannot be done (unknown version, bad weights, no Serve running)."""

    status, type, code = 400, "invalid_request_error", "invalid_control_request"
