"""python -m orchestrator --slm HOST:PORT --llm HOST:PORT [--redis URL] [--port N]"""

import argparse
import logging
import sys

from engine.grpc_server import serve_until_signalled, start_server
from rstitch.v1 import orchestrator_pb2_grpc

from .engine_client import GrpcEngineClient
from .service import Defaults, Orchestrator
from .servicer import SERVICE_NAME, OrchestratorServicer
from .store import MemorySessionStore, RedisSessionStore, StoreUnavailable


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m orchestrator", description="Serve the R-Stitch orchestrator over gRPC.")
    p.add_argument("--slm", default="127.0.0.1:50051", help="SLM engine address")
    p.add_argument("--llm", default="127.0.0.1:50052", help="LLM engine address")
    p.add_argument("--redis", help="redis://[:password@]host:port/db (or rediss://); default: an in-process store")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 in a container)")
    p.add_argument("--port", type=int, default=50050, help="0 picks a free port")
    p.add_argument("--tau", type=float, default=Defaults.tau, help="default entropy threshold")
    p.add_argument("--max-new-tokens", type=int, default=Defaults.max_new_tokens, help="default answer length")
    p.add_argument("--max-new-tokens-limit", type=int, default=Defaults.max_new_tokens_limit)
    p.add_argument("--session-ttl", type=int, default=24 * 3600, help="seconds a finished session stays in Redis")
    p.add_argument("--engine-wait", type=float, default=120, help="seconds to wait for the engines at start-up")
    p.add_argument("--workers", type=int, default=32, help="gRPC worker threads (concurrent sessions)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s orchestrator %(levelname)s %(message)s")
    if args.redis:
        store = RedisSessionStore(args.redis, finished_ttl_s=args.session_ttl)
        try:
            store.ping()
        except StoreUnavailable as e:
            sys.exit(f"orchestrator: {e}")
    else:
        store = MemorySessionStore()
        logging.warning("no --redis given: sessions live in this process only and are lost when it stops")
    slm, llm = GrpcEngineClient(args.slm), GrpcEngineClient(args.llm)
    try:
        for engine in (slm, llm):
            engine.wait_ready(args.engine_wait)
        defaults = Defaults(args.tau, args.max_new_tokens, args.max_new_tokens_limit)
        orchestrator = Orchestrator(slm, llm, store, defaults)
    except (ConnectionError, ValueError) as e:
        sys.exit(f"orchestrator: {e}")
    server, port = start_server(
        lambda s: orchestrator_pb2_grpc.add_OrchestratorServicer_to_server(OrchestratorServicer(orchestrator), s),
        [SERVICE_NAME], args.host, args.port, args.workers,
    )
    logging.info("serving orchestrator on %s:%d", args.host, port)
    serve_until_signalled(server)


if __name__ == "__main__":
    main()
