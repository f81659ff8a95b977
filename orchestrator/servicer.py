"""The gRPC face of the orchestrator (errors become statuses in common.grpc_server.guarded)."""

from common.grpc_server import guarded
from rstitch.v1 import orchestrator_pb2 as opb
from rstitch.v1 import orchestrator_pb2_grpc

from .service import Orchestrator
from .telemetry import timed


class OrchestratorServicer(orchestrator_pb2_grpc.OrchestratorServicer):
    def __init__(self, orchestrator: Orchestrator):
        self.orchestrator = orchestrator

    @guarded
    def Generate(self, request, context):
        yield from timed(self.orchestrator.generate(request.spec, context.time_remaining(), context.is_active,
                                                    request.session_id), "grpc")

    @guarded
    def Resume(self, request, context):
        yield from self.orchestrator.resume(request.session_id, request.received_tokens, context.time_remaining(),
                                            context.is_active)

    @guarded
    def Complete(self, request, context):
        events = self.orchestrator.generate(request.spec, context.time_remaining(), context.is_active)
        return opb.CompleteResponse(session=self.orchestrator.run_to_end(timed(events, "grpc")))

    @guarded
    def GetSession(self, request, context):
        return opb.GetSessionResponse(session=self.orchestrator.session(request.session_id))

    @guarded
    def Cancel(self, request, context):
        return opb.CancelResponse(status=self.orchestrator.cancel(request.session_id))


SERVICE_NAME = opb.DESCRIPTOR.services_by_name["Orchestrator"].full_name
