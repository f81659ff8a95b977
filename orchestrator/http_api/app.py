"""The routes: POST /v1/chat/completions and /v1/completions (plain, or streamed as server-sent
events), GET /v1/models, GET /health; a bearer token on /v1 when the orchestrator requires one."""

import asyncio
import json
import time
from concurrent.futures import Executor

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.exceptions import HTTPException

from common.grpc_server import MAX_MESSAGE_BYTES

from ..policies import LLM, SLM
from ..service import Orchestrator, RequestError
from ..telemetry import timed
from .errors import ApiError, as_api_error, bad_request, validation_error
from .guards import BearerToken, BodyLimit
from .render import CHAT, TEXT, Answer, Chunks, Reply
from .schema import ChatCompletionRequest, CompletionRequest, GenerationRequest
from .stream import Generation, cancel_on_disconnect

# A comment line every this many seconds keeps proxies from closing a stream that waits (e.g. in the queue).
PING_S = 15


def create_app(orchestrator: Orchestrator, executor: Executor, token: str | None = None) -> FastAPI:
    """The HTTP API onto `orchestrator`; generations run on `executor`'s threads."""
    app = FastAPI(title="R-Stitch", summary="The OpenAI-compatible API of an R-Stitch orchestrator",
                  version="0.1.0")
    door = Door(orchestrator, executor)
    api = APIRouter(prefix="/v1")

    @api.get("/models")
    async def models():
        return door.models()

    @api.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await door.answer(request, body, CHAT)

    @api.post("/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await door.answer(request, body, TEXT)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    app.include_router(api)
    _install_error_handlers(app)
    app.add_middleware(BodyLimit, limit=MAX_MESSAGE_BYTES)  # as the gRPC server's message limit
    if token is not None:
        app.add_middleware(BearerToken, token=token)  # added last: runs first
    return app


class Door:
    """Requests of the OpenAI API as generations of the orchestrator."""

    def __init__(self, orchestrator: Orchestrator, executor: Executor):
        self.orchestrator, self.executor = orchestrator, executor
        self.model = orchestrator.infos[LLM].model_id  # the pair is known by its LLM's name
        self.created = int(time.time())

    def models(self) -> dict:
        infos = self.orchestrator.infos
        return {"object": "list", "data": [{
            "id": self.model, "object": "model", "created": self.created, "owned_by": "rstitch",
            "max_model_len": self.orchestrator.max_context,
            "rstitch": {"slm": infos[SLM].model_id, "llm": infos[LLM].model_id}}]}

    async def answer(self, request: Request, body: GenerationRequest, kind: str):
        if body.model != self.model:
            raise ApiError(404, f"the model {body.model!r} is not served here; this server serves {self.model!r} "
                                "(GET /v1/models)", "model", "model_not_found")
        field, max_tokens = body.answer_limit
        limit = self.orchestrator.settings.max_new_tokens_limit
        if max_tokens is not None and max_tokens > limit:
            raise bad_request(field, f"{field} is {max_tokens}, above this server's limit of {limit}")
        spec = body.to_spec()
        reply = Reply(kind, self.model, self.orchestrator.tokenizer, logprobs=spec.logprobs)
        generation = Generation(lambda alive: timed(self.orchestrator.generate(spec, None, alive), "http"),
                                self.executor)
        watcher = asyncio.create_task(cancel_on_disconnect(request, generation))
        try:
            if not body.stream:
                answer = Answer()
                async for event in generation:
                    answer.add(event, reply)
                return answer.body(reply)
            opening = await generation.opening()
        except BaseException:
            generation.cancel()
            raise
        finally:
            watcher.cancel()
        return EventSourceResponse(_server_sent(opening, generation, Chunks(reply, body.include_usage)),
                                   sep="\n", ping=PING_S)


async def _server_sent(opening, generation: Generation, chunks: Chunks):
    """The stream's events: a chunk per answer token, an error (if one ends it early), then [DONE]."""
    try:
        try:
            for event in opening:
                for chunk in chunks.of(event):
                    yield _event(chunk)
            async for event in generation:
                for chunk in chunks.of(event):
                    yield _event(chunk)
        except Exception as e:  # the status line has gone out: the error travels in the stream, as vLLM's
            yield _event(as_api_error(e).body())
        yield ServerSentEvent(data="[DONE]")
    finally:
        generation.cancel()  # a client that went away, or one answered: the worker stops either way


def _event(body: dict) -> ServerSentEvent:
    return ServerSentEvent(data=json.dumps(body, separators=(",", ":")))


def _install_error_handlers(app: FastAPI) -> None:
    def respond(error: ApiError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(ApiError)
    async def api_error(request, error: ApiError):
        return respond(error)

    @app.exception_handler(RequestError)
    async def refused(request, error: RequestError):
        return respond(as_api_error(error))

    @app.exception_handler(RequestValidationError)
    async def invalid(request, error: RequestValidationError):
        return respond(validation_error(error.errors()))

    @app.exception_handler(HTTPException)
    async def http_error(request, error: HTTPException):  # unknown paths, wrong methods, bodies over the limit
        return respond(ApiError(error.status_code, f"{request.method} {request.url.path}: {error.detail}"))

    @app.exception_handler(Exception)
    async def bug(request, error: Exception):  # the server logs its traceback
        return respond(ApiError(500, f"the request failed: {error!r}"))
