"""The gRPC face of an Engine: maps calls onto it and its errors onto status codes."""

import functools
import logging

import grpc

from rstitch.v1 import engine_pb2 as pb
from rstitch.v1 import engine_pb2_grpc

from .backend import Engine
from .errors import CACHE_LEN_KEY, RETRYABLE_KEY, EngineError

log = logging.getLogger(__name__)


def _guarded(method):
    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            return method(self, request, context)
        except EngineError as e:
            metadata = [(CACHE_LEN_KEY, str(e.cache_len))] if e.cache_len is not None else []
            if e.retryable:
                metadata.append((RETRYABLE_KEY, "1"))
            context.set_trailing_metadata(metadata)
            context.abort(e.code, str(e))
        except Exception as e:  # never let a bug take the service down; say what happened
            log.exception("%s failed", method.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"{method.__name__} failed inside the engine: {e!r}")

    return wrapper


class EngineServicer(engine_pb2_grpc.EngineServicer):
    def __init__(self, engine: Engine):
        self.engine = engine

    @_guarded
    def Prefill(self, request, context):
        return self.engine.prefill(request)

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
