"""OpenAI-shaped errors, `{"error": {"message", "type", "param", "code"}}`, with the HTTP status that says
what went wrong: 400 the request, 401 the token, 404 the model or path, 429 this replica's admission
limits, 503 Redis or the engines."""

import logging

import grpc

from ..service import RequestError

log = logging.getLogger(__name__)

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 409: "conflict_error",
               413: "invalid_request_error", 429: "rate_limit_error",
               499: "cancelled", 500: "server_error", 501: "not_implemented_error", 503: "service_unavailable_error",
               504: "timeout_error"}
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,  # e.g. the router policy on an SLM without hidden states
    grpc.StatusCode.UNAUTHENTICATED: 401, grpc.StatusCode.PERMISSION_DENIED: 403, grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409, grpc.StatusCode.ABORTED: 409, grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,  # nginx's "client closed request": nobody reads it
    grpc.StatusCode.UNIMPLEMENTED: 501, grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


def bad_request(param: str, message: str) -> ApiError:
    return ApiError(400, message, param)


def as_api_error(error: Exception) -> ApiError:
    """What a client is told of `error`: a refusal of the core keeps its meaning, anything else is a bug
    (logged with its traceback here) and a 500."""
    if isinstance(error, ApiError):
        return error
    if isinstance(error, RequestError):
        message = str(error)
        status = HTTP_STATUS.get(error.code, 500)
        if error.code == grpc.StatusCode.RESOURCE_EXHAUSTED and not error.retryable:
            status = 400  # a size limit: no reason to retry (OpenAI clients retry every 429)
        return ApiError(status, message, code=error.code.name.lower())
    log.error("HTTP request failed", exc_info=error)
    return ApiError(500, f"the request failed: {error!r}")


def validation_error(errors: list[dict]) -> ApiError:
    """A 400 for what pydantic found wrong with a request body, naming the field (the first one wrong)."""
    first = errors[0]
    loc = [part for part in first.get("loc", ()) if part != "body"]
    param = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".") or None
    if first.get("type") == "extra_forbidden":
        message = f"{param} is not supported by this server"
    elif first.get("type") == "json_invalid":
        param, message = None, f"the body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}"
    elif first.get("type") in ("model_attributes_type", "model_type", "dict_type") and param is None:
        message = "the body must be a JSON object, sent with Content-Type: application/json"
    else:
        message = first["msg"].removeprefix("Value error, ")
        message = f"{param}: {message}" if param else message
    return bad_request(param, message)
