"""The one error type for mistakes a user or a client can fix, and a validation error as one line.

    raise PixelrayError("model 'x' is not served here", status=404, code="model_not_found")

`status` is the HTTP status the Serve app answers with (400 unless given), `type` the OpenAI-style
error type that follows from it and `code` a short machine-readable label. The same error is a
`pixelray COMMAND: error: ...` line (exit status 2) on the command line, a JSON error body in the
Serve app, and an error row in a batch job (ImageError's `code` is the row's `error_type`).
Subclasses name a cause worth catching on its own (ImageError, ModelNotAvailableError, LLMServerError).
A failure that passes by itself (a server down, a timeout, HTTP 429 or 5xx) is `transient`: its batch
error row has error_type TRANSIENT, and `--resume` tries that item again.
"""

from __future__ import annotations

from pydantic import ValidationError

TRANSIENT = "transient"  # the error_type of an item that failed for a passing reason; --resume retries it
_TYPES = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}


class PixelrayError(Exception):
    status: int = 400
    code: str | None = None

    def __init__(self, message: str, status: int | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.status = status or type(self).status
        self.code = code or type(self).code or str(self.status)

    @property
    def type(self) -> str:
        return _TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")

    def __reduce__(self):  # status and code survive Ray's pickling
        return type(self), (self.message, self.status, self.code)


def validation_message(error: ValidationError, names: dict[str, str] | None = None) -> str:
    """A pydantic ValidationError as one line: `field.sub: what is wrong; other: ...`, a field named
    as `names` says (a command-line option, say) where it says."""
    parts = []
    for e in error.errors():
        where = ".".join(str(x) for x in e["loc"] if x != "body")
        what = str(e["ctx"]["error"]) if e["type"] == "value_error" else e["msg"]  # without "Value error, "
        parts.append(f"{(names or {}).get(where, where)}: {what}" if where else what)
    return "; ".join(parts)
