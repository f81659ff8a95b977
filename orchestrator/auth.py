"""Optional bearer-token authentication of the orchestrator's public API.

Only rstitch.v1.Orchestrator methods need the token: health checks and reflection stay open, so
probes and load balancers work without a secret.
"""

import hmac
import os

import grpc

from .servicer import SERVICE_NAME

TOKEN_ENV = "RSTITCH_AUTH_TOKEN"


class BearerTokenInterceptor(grpc.ServerInterceptor):
    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(f"/{SERVICE_NAME}/"):
            return handler
        given = dict(handler_call_details.invocation_metadata).get("authorization")
        if given is None:
            return _refusal(handler, "this orchestrator requires metadata 'authorization: Bearer <token>' "
                                     "(rstitch --token, or $RSTITCH_TOKEN)")
        # Constant time, so the reply's timing does not tell how much of a guess was right.
        if not hmac.compare_digest(given.encode(), self._expected):
            return _refusal(handler, "the bearer token is not valid for this orchestrator")
        return handler


def _refusal(handler, message: str):
    """A handler of the same shape as the refused method's that only answers UNAUTHENTICATED."""
    def refuse(request, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    # Every Orchestrator method takes one request; Generate streams its replies.
    make = grpc.unary_stream_rpc_method_handler if handler.response_streaming else grpc.unary_unary_rpc_method_handler
    return make(refuse, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


def add_auth_args(parser) -> None:
    parser.add_argument("--auth-token-file", metavar="FILE",
                        help=f"require 'authorization: Bearer <token>' with the token in FILE (or ${TOKEN_ENV}) "
                             "on every Orchestrator call; health and reflection stay open")


def token_from_args(parser, args) -> str | None:
    """The bearer token every API call must carry (gRPC and HTTP alike); None: none is required."""
    token, source = os.environ.get(TOKEN_ENV), f"${TOKEN_ENV}"
    if args.auth_token_file is not None:
        source = f"argument --auth-token-file: {args.auth_token_file}"
        try:
            with open(args.auth_token_file, encoding="utf-8") as f:
                token = f.read().strip()
        except (OSError, UnicodeDecodeError) as e:
            parser.error(f"{source}: cannot read it: {getattr(e, 'strerror', None) or e}")
    if token is None:
        return None
    if not token:
        parser.error(f"{source}: the token is empty")
    if not (token.isascii() and token.isprintable()):  # a metadata value travels as printable ASCII
        parser.error(f"{source}: the token must be printable ASCII, as clients send it in a header")
    return token
