"""The asyncio client (grpc.aio): RStitchClient's methods as coroutines, for applications that serve many
users from one event loop.

    async with AsyncRStitchClient("127.0.0.1:50050") as client:
        result = await client.generate("(69*4-13)*3", policy="entropy", tau=0.05)
        async for event in client.stream("Hello"):
            ...

A generation rides through restarts as RStitchClient.generate's does (rstitch.client holds the rules:
the session id is chosen here, a broken stream is continued with Resume, backoff for up to retry_s
seconds without a new token); only the waiting is the event loop's instead of the thread's.
"""

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import grpc

from .client import (
    CHANNEL_OPTIONS,
    CONNECT_ERROR_S,
    DEFAULT_RETRY_S,
    RETRY_CODES,
    GenerationResult,
    _generate_next,
    _Patience,
    _take,
    make_spec,
)
from .security import ClientTLS, channel_credentials
from .v1 import orchestrator_pb2 as opb
from .v1 import orchestrator_pb2_grpc


def channel(address: str, tls: ClientTLS | None = None, token: str | None = None, options=()) -> grpc.aio.Channel:
    """rstitch.security.channel's channel, on grpc.aio."""
    credentials, options = channel_credentials(tls, token, options)
    if credentials is None:
        return grpc.aio.insecure_channel(address, options)
    return grpc.aio.secure_channel(address, credentials, options)


class AsyncRStitchClient:
    def __init__(self, address: str, timeout: float | None = 300, *, tls: ClientTLS | None = None,
                 token: str | None = None, retry_s: float = DEFAULT_RETRY_S):
        """As RStitchClient's; make it inside the event loop that uses it."""
        self.address = address
        self.timeout = timeout
        self.retry_s = retry_s
        self._channel = channel(address, tls, token, CHANNEL_OPTIONS)
        self._stub = orchestrator_pb2_grpc.OrchestratorStub(self._channel)

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()

    async def close(self):
        await self._channel.close()

    def stream(self, prompt=None, **options) -> AsyncIterator[opb.GenerateResponse]:
        """The raw events of one Generate call (async for): Started, a Delta per token, Finished; never retried."""
        return self._stub.Generate(opb.GenerateRequest(spec=make_spec(prompt, **options)), timeout=self.timeout)

    async def generate(self, prompt=None, on_text=None, **options) -> GenerationResult:
        """Stream one generation and gather it, riding through restarts (see RStitchClient.generate)."""
        return await _Attachment(self, make_spec(prompt, **options), uuid.uuid4().hex, on_text).run()

    async def resume(self, session_id: str, received_tokens: int = 0) -> GenerationResult:
        """Attach to a session by id: its answer from token `received_tokens` on, to its end."""
        return await _Attachment(self, None, session_id, received_tokens=received_tokens).run()

    async def complete(self, prompt=None, **options) -> opb.Session:
        """The unary Complete call: waits for a reachable orchestrator, but is not retried once sent."""
        request = opb.CompleteRequest(spec=make_spec(prompt, **options))
        return (await self._unary(self._stub.Complete, request, retry=False)).session

    async def session(self, session_id: str) -> opb.Session:
        return (await self._unary(self._stub.GetSession, opb.GetSessionRequest(session_id=session_id))).session

    async def cancel(self, session_id: str) -> int:
        return (await self._unary(self._stub.Cancel, opb.CancelRequest(session_id=session_id))).status

    async def _unary(self, method, request, retry: bool = True):
        patience = _AsyncPatience(self.retry_s, self._deadline())
        while True:
            try:
                return await self._call(method, request, patience)
            except grpc.aio.AioRpcError as e:
                if not retry or e.code() not in RETRY_CODES:
                    raise
                await patience.wait(e)

    async def _call(self, method, request, patience: "_AsyncPatience"):
        return await method(request, **await self._call_options(patience))

    async def _call_options(self, patience: "_AsyncPatience") -> dict:
        """How to send a call: once a replica is connected, as rstitch.client does. Where none is within the
        patience left, it is sent anyway and fails at once with the channel's own error (connection refused,
        a TLS handshake refused...), given a moment past the deadline to say so."""
        try:
            await asyncio.wait_for(self._channel.channel_ready(), max(0.0, patience.give_up_at() - time.monotonic()))
        except asyncio.TimeoutError:
            left = patience.time_left()
            return {"timeout": None if left is None else max(left, CONNECT_ERROR_S)}
        return {"timeout": patience.time_left(), "wait_for_ready": True}

    def _deadline(self) -> float | None:
        return None if self.timeout is None else time.monotonic() + self.timeout


class _AsyncPatience(_Patience):
    """rstitch.client's retries, waiting on the event loop instead of the thread."""

    async def wait(self, error: grpc.RpcError, session_id: str = "") -> None:
        await asyncio.sleep(self.next_pause(error, session_id))


class _Attachment:
    """One generation as this client follows it across broken streams (rstitch.client._Attachment's rules)."""

    def __init__(self, client: AsyncRStitchClient, spec: opb.GenerationSpec | None, session_id: str, on_text=None,
                 received_tokens: int = 0):
        self.client, self.spec, self.on_text = client, spec, on_text
        self.result = GenerationResult(session_id=session_id)
        self.held_before = received_tokens
        self.started = spec is None  # whether the session is known to exist

    async def run(self) -> GenerationResult:
        patience = _AsyncPatience(self.client.retry_s, self.client._deadline())
        generating = self.spec is not None
        while True:
            received = len(self.result.token_ids)
            try:
                async for event in self._events(generating, patience):
                    self.started |= event.HasField("started")
                    _take(event, self.result, self.on_text)
                return self.result
            except grpc.aio.AioRpcError as e:
                if len(self.result.token_ids) > received:
                    patience.progressed()
                generating = _generate_next(generating, self.started, e)
                await patience.wait(e, self.result.session_id)
                self.result.reattaches += 1

    async def _events(self, generating: bool, patience: _AsyncPatience):
        client = self.client
        options = await client._call_options(patience)
        if generating:
            request = opb.GenerateRequest(spec=self.spec, session_id=self.result.session_id)
            call = client._stub.Generate(request, **options)
        else:
            request = opb.ResumeRequest(session_id=self.result.session_id,
                                        received_tokens=self.held_before + len(self.result.token_ids))
            call = client._stub.Resume(request, **options)
        async for event in call:
            yield event
