"""One generation of the core (a blocking generator of events) driven on a worker thread and read from
the event loop, so that a slow engine call never holds the loop that serves every other request.

Going away works as in the gRPC servicer (common.grpc_server.guarded): once cancelled, the worker
stops at the next event and closes the core's generator, which cancels the engine call it is in;
between events, the loop's own check of `caller_alive` stops it before the next engine call.
"""

import asyncio
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Executor

import grpc
from starlette.requests import Request

from rstitch.v1 import orchestrator_pb2 as opb

from ..service import RequestError


class _End:
    pass


class Generation:
    """start(caller_alive) -> the core's events, run on `executor`; iterate it with `async for`."""

    def __init__(self, start: Callable[[Callable[[], bool]], Iterator[opb.GenerateResponse]], executor: Executor):
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()
        self._gone = threading.Event()
        executor.submit(self._run, start)

    def cancel(self) -> None:
        """The client went away (or is answered): stop the generation."""
        self._gone.set()

    def _alive(self) -> bool:
        return not self._gone.is_set()

    def _run(self, start) -> None:
        events = None
        try:
            events = start(self._alive)
            for event in events:
                if self._gone.is_set():
                    raise RequestError(grpc.StatusCode.CANCELLED, "the client went away")
                self._hand_over(event)
            self._hand_over(_End())
        except Exception as e:  # RequestError, or a bug: the reader reports it
            self._hand_over(e)
        finally:
            if events is not None:
                events.close()  # after a cancel: GeneratorExit in the core, which cancels the engine call

    def _hand_over(self, item) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed (the server stopped): nobody reads any more
            self._gone.set()

    def __aiter__(self):
        return self

    async def __anext__(self) -> opb.GenerateResponse:
        item = await self._queue.get()
        if isinstance(item, _End):
            raise StopAsyncIteration
        if isinstance(item, Exception):
            raise item
        return item

    async def opening(self) -> list[opb.GenerateResponse]:
        """The events up to the first answer token (or the end): the ones a status code can still
        answer for, as no byte of the response has gone out yet."""
        events = []
        async for event in self:
            events.append(event)
            if event.HasField("finished") or (event.HasField("delta") and event.delta.span.token_ids):
                break
        return events


async def cancel_on_disconnect(request: Request, generation: Generation) -> None:
    """Run beside a request whose body has been read: cancels the generation when the client disconnects."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    generation.cancel()
