"""The gRPC face of the orchestrator."""

import functools
import logging

import grpc

from rstitch.v1 import orchestrator_pb2 as opb
from rstitch.v1 import orchestrator_pb2_grpc

from .service import Orchestrator, RequestError

log = logging.getLogger(__name__)


def _abort_on_error(context, error: Exception):
    if isinstance(error, RequestError):
        context.abort(error.code, str(error))
    log.exception("request failed", exc_info=error)
    context.abort(grpc.StatusCode.INTERNAL, f"orchestrator error: {error!r}")


def _guarded(method):
    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            return method(self, request, context)
        except Exception as e:
            _abort_on_error(context, e)

    return wrapper


def _streamed(events, context):
    try:
        for event in events:
            if not context.is_active():  # client cancelled or disconnected
                return
            yield event
    except Exception as e:
        _abort_on_error(context, e)
    finally:
        events.close()  # a caller that went away ends the session at this span boundary


class OrchestratorServicer(orchestrator_pb2_grpc.OrchestratorServicer):
    def __init__(self, orchestrator: Orchestrator):
        self.orchestrator = orchestrator

    def Generate(self, request, context):
        yield from _streamed(self.orchestrator.generate(request.spec, context.time_remaining(), context.is_active),
                             context)

    def Resume(self, request, context):
        yield from _streamed(
            self.orchestrator.resume(request.session_id, request.received_tokens, context.time_remaining(),
                                     context.is_active), context)

    @_guarded
    def Complete(self, request, context):
        session = self.orchestrator.complete(request.spec, context.time_remaining(), context.is_active)
        return opb.CompleteResponse(session=session)

    @_guarded
    def GetSession(self, request, context):
        return opb.GetSessionResponse(session=self.orchestrator.session(request.session_id))

    @_guarded
    def Cancel(self, request, context):
        return opb.CancelResponse(status=self.orchestrator.cancel(request.session_id))


SERVICE_NAME = opb.DESCRIPTOR.services_by_name["Orchestrator"].full_name
