"""python -m orchestrator --slm HOST:PORT --llm HOST:PORT [--redis URL] [--port N]"""

import argparse
import logging
import sys
from pathlib import Path

from engine import telemetry
from engine.default_models import default_router_path
from engine.grpc_server import serve_until_signalled, start_server
from rstitch.security import (add_client_tls_args, add_server_tls_args, client_tls_from_args,
                              server_credentials_from_args)
from rstitch.v1 import orchestrator_pb2_grpc

from .auth import add_auth_args, interceptors_from_args
from .engine_client import GrpcEngineClient
from .replicas import EnginePool
from .service import Orchestrator, Settings
from .servicer import SERVICE_NAME, OrchestratorServicer
from .store import MemorySessionStore, RedisSessionStore, StoreUnavailable
from .telemetry import OrchestratorCollector


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m orchestrator", description="Serve the R-Stitch orchestrator over gRPC.")
    p.add_argument("--slm", default="127.0.0.1:50051",
                   help="SLM engine address; several replicas: comma-separated, or a name resolving to several IPs")
    p.add_argument("--llm", default="127.0.0.1:50052", help="LLM engine address(es), as --slm")
    p.add_argument("--redis", help="redis://[:password@]host:port/db (or rediss://); default: an in-process store")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 in a container)")
    p.add_argument("--port", type=int, default=50050, help="0 picks a free port")
    p.add_argument("--tau", type=float, default=Settings.tau, help="default entropy threshold")
    p.add_argument("--router", type=Path,
                   help="router of the router policy when a request sends none (default: the committed trained "
                        f"router, {default_router_path()}, when it fits the SLM)")
    p.add_argument("--max-new-tokens", type=int, default=Settings.max_new_tokens, help="default answer length")
    p.add_argument("--max-new-tokens-limit", type=int, default=Settings.max_new_tokens_limit,
                   help="largest max_new_tokens a request may ask for")
    p.add_argument("--max-prompt-tokens", type=int, default=0, help="longest prompt accepted (0: the models' context)")
    p.add_argument("--max-sessions", type=int, default=Settings.max_sessions,
                   help="generations this replica drives at once")
    p.add_argument("--max-queue", type=int, default=Settings.max_queue,
                   help="generations waiting for a slot; past it requests get RESOURCE_EXHAUSTED")
    p.add_argument("--engine-retry", type=float, default=Settings.engine_retry_s,
                   help="seconds an engine call retries an unreachable or overloaded engine")
    p.add_argument("--redis-retry", type=float, default=30,
                   help="seconds a running session's writes wait for Redis to come back")
    p.add_argument("--lease", type=float, default=10,
                   help="seconds without renewal after which another replica may take a session over")
    p.add_argument("--session-ttl", type=int, default=24 * 3600,
                   help="seconds a finished session stays in the store (a running one: a day past its last span)")
    p.add_argument("--engine-wait", type=float, default=120, help="seconds to wait for the engines at start-up")
    p.add_argument("--workers", type=int, default=0,
                   help="gRPC worker threads (default: max sessions + max queue + 16 for the other calls)")
    add_server_tls_args(p)
    add_client_tls_args(p, "engine-", "the engines")
    add_auth_args(p)
    telemetry.add_telemetry_args(p)
    args = p.parse_args(argv)
    args.credentials, args.interceptors = server_credentials_from_args(p, args), interceptors_from_args(p, args)
    args.engine_tls = client_tls_from_args(p, args, "engine-")
    return args


def read_router(path: Path | None) -> bytes:
    """The --router file's bytes; without one, the committed router if it is there."""
    if path is None:
        path = default_router_path()
        return path.read_bytes() if path.exists() else b""
    try:
        return path.read_bytes()
    except OSError as e:
        sys.exit(f"orchestrator: cannot read --router {path}: {e.strerror}")


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s orchestrator %(levelname)s %(message)s")
    telemetry.setup_tracing("rstitch-orchestrator")  # before the engine clients: their channels carry the context
    if args.redis:
        store = RedisSessionStore(args.redis, retry_s=args.redis_retry, ttl_s=args.session_ttl, lease_s=args.lease)
        try:
            store.ping()
        except StoreUnavailable as e:
            sys.exit(f"orchestrator: {e}")
    else:
        store = MemorySessionStore(ttl_s=args.session_ttl, lease_s=args.lease)
        logging.warning("no --redis given: sessions live in this process only and are lost when it stops")
    connect = lambda address: GrpcEngineClient(address, args.engine_tls)  # noqa: E731
    slm, llm = (EnginePool(addresses.split(","), connect) for addresses in (args.slm, args.llm))
    try:
        for pool in (slm, llm):
            for engine in pool.clients.values():
                engine.wait_ready(args.engine_wait)
        settings = Settings(tau=args.tau, max_new_tokens=args.max_new_tokens,
                            max_new_tokens_limit=args.max_new_tokens_limit, max_prompt_tokens=args.max_prompt_tokens,
                            max_sessions=args.max_sessions, max_queue=args.max_queue,
                            engine_retry_s=args.engine_retry, router=read_router(args.router))
        orchestrator = Orchestrator(slm, llm, store, settings)
        if args.router and not orchestrator.router:
            raise ValueError(f"--router {args.router} does not fit the SLM (see the warning above)")
    except (ConnectionError, ValueError) as e:
        sys.exit(f"orchestrator: {e}")
    server, port = start_server(
        lambda s: orchestrator_pb2_grpc.add_OrchestratorServicer_to_server(OrchestratorServicer(orchestrator), s),
        [SERVICE_NAME], args.host, args.port, args.workers or args.max_sessions + args.max_queue + 16,
        args.credentials, args.interceptors,
    )
    telemetry.serve_metrics(args.host, args.metrics_port, OrchestratorCollector(orchestrator))
    logging.info("serving orchestrator on %s:%d", args.host, port)
    serve_until_signalled(server)


if __name__ == "__main__":
    main()
