"""The gRPC face of an Engine: maps calls onto it and its errors onto status codes."""

import functools
import logging

import grpc

from rstitch.v1 import engine_pb2 as pb
from rstitch.v1 import engine_pb2_grpc

from .backend import Engine
from .errors import CACHE_LEN_KEY, RETRYABLE_KEY, EngineError

log = logging.getLogger(__name__)


def _abort(context, method_name: str, error: Exception):
    if isinstance(error, EngineError):
        metadata = [(CACHE_LEN_KEY, str(error.cache_len))] if error.cache_len is not None else []
        if error.retryable:
            metadata.append((RETRYABLE_KEY, "1"))
        context.set_trailing_metadata(metadata)
        context.abort(error.code, str(error))
    # never let a bug take the service down; say what happened
    log.error("%s failed", method_name, exc_info=error)
    context.abort(grpc.StatusCode.INTERNAL, f"{method_name} failed inside the engine: {error!r}")


def _guarded(method):
    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            return method(self, request, context)
        except Exception as e:
            _abort(context, method.__name__, e)

    return wrapper


def _guarded_stream(method):
    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            yield from method(self, request, context)
        except Exception as e:
            _abort(context, method.__name__, e)

    return wrapper


class EngineServicer(engine_pb2_grpc.EngineServicer):
    def __init__(self, engine: Engine):
        self.engine = engine

    @_guarded
    def Prefill(self, request, context):
        return self.engine.prefill(request)

    @_guarded_stream
    def StreamSpan(self, request, context):
        return self.engine.stream_span(request)

    @_guarded
    def Decode(self, request, context):
        return self.engine.decode(request)

    @_guarded
    def Rollback(self, request, context):
        return self.engine.rollback(request)

    @_guarded
    def Release(self, request, context):
        return self.engine.release(request)

    @_guarded
    def Info(self, request, context):
        return self.engine.info()

    @_guarded
    def GetTokenizer(self, request, context):
        return self.engine.tokenizer_files()


SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Engine"].full_name
