"""Errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with llama.cpp's types."""
from __future__ import annotations

from fastapi.responses import JSONResponse

TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
         405: "invalid_request_error", 413: "invalid_request_error", 503: "unavailable_error"}


class APIError(Exception):
    """Raised anywhere in a request: the handler turns it into its status and error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or TYPES.get(status, "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)


def server_error(exc: BaseException) -> APIError:
    # the message names the failure without a traceback; the server log has the rest
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}", code="internal_error", type_="server_error")
