"""The gRPC face of an Engine: maps calls onto it (errors become statuses in common.grpc_server.guarded)."""

from common.grpc_server import guarded
from rstitch.v1 import engine_pb2 as pb
from rstitch.v1 import engine_pb2_grpc

from .backend import Engine


class EngineServicer(engine_pb2_grpc.EngineServicer):
    def __init__(self, engine: Engine):
        self.engine = engine

    @guarded
    def Prefill(self, request, context):
        return self.engine.prefill(request)

    @guarded
    def StreamSpan(self, request, context):
        yield from self.engine.stream_span(request)

    @guarded
    def Decode(self, request, context):
        return self.engine.decode(request)

    @guarded
    def Rollback(self, request, context):
        return self.engine.rollback(request)

    @guarded
    def Release(self, request, context):
        return self.engine.release(request)

    @guarded
    def Info(self, request, context):
        return self.engine.info()

    @guarded
    def GetTokenizer(self, request, context):
        return self.engine.tokenizer_files()


SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Engine"].full_name
