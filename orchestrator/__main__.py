"""python -m orchestrator --slm HOST:PORT --llm HOST:PORT [--redis URL] [--port N] [--http-port N]"""

import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import flags, telemetry
from common.errors import EngineError
from common.grpc_server import serve_until_signalled, start_server
from engine.default_models import default_router_path
from rstitch.security import (
    add_client_tls_args,
    add_server_tls_args,
    client_tls_from_args,
    server_credentials_from_args,
)
from rstitch.v1 import orchestrator_pb2_grpc

from .auth import BearerTokenInterceptor, add_auth_args, token_from_args
from .engine_client import GrpcEngineClient
from .replicas import EnginePool
from .service import Orchestrator, Settings
from .servicer import SERVICE_NAME, OrchestratorServicer
from .store import MemorySessionStore, RedisSessionStore, StoreUnavailable
from .telemetry import OrchestratorCollector

# Redis keeps a lease in whole milliseconds and the driving replica renews it every third of one: below
# this, renewals would be most of what the store does.
MIN_LEASE_S = 0.1


def make_parser() -> flags.Parser:
    p = flags.Parser(prog="python -m orchestrator", description="Serve the R-Stitch orchestrator over gRPC.")
    p.add_argument("--slm", type=flags.engine_addresses, default="127.0.0.1:50051",
                   help="SLM engine address HOST:PORT; several replicas: comma-separated, or a name resolving to "
                        "several IPs")
    p.add_argument("--llm", type=flags.engine_addresses, default="127.0.0.1:50052",
                   help="LLM engine address(es), as --slm")
    p.add_argument("--redis", type=flags.redis_url,
                   help="redis://[:password@]host:port/db, rediss:// (TLS) or unix://path; default: an in-process "
                        "store")
    p.add_argument("--host", type=flags.host, default="127.0.0.1",
                   help="address to listen on (0.0.0.0 in a container; IPv6 in brackets)")
    p.add_argument("--port", type=flags.port, default=50050, help="0 picks a free port")
    p.add_argument("--http-port", type=flags.port,
                   help="also serve the OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, "
                        "/v1/models, /health) on this port, with the same TLS and token (0 picks a free port); "
                        "default: off")
    p.add_argument("--tau", type=flags.number(0, 1), default=Settings.tau,
                   help="entropy threshold of requests that send none, in [0, 1]")
    p.add_argument("--router", type=flags.readable_file,
                   help="router of the router policy when a request sends none (default: the committed trained "
                        f"router, {default_router_path()}, when it fits the SLM)")
    p.add_argument("--max-new-tokens", type=flags.integer(1, flags.UINT32_MAX), default=Settings.max_new_tokens,
                   help="answer length of requests that ask for none; at most --max-new-tokens-limit")
    p.add_argument("--max-new-tokens-limit", type=flags.integer(1, flags.UINT32_MAX),
                   default=Settings.max_new_tokens_limit, help="largest max_new_tokens a request may ask for")
    p.add_argument("--max-prompt-tokens", type=flags.integer(0, flags.UINT32_MAX), default=Settings.max_prompt_tokens,
                   help="longest prompt accepted (0: the models' context)")
    p.add_argument("--max-sessions", type=flags.integer(1), default=Settings.max_sessions,
                   help="generations this replica drives at once")
    p.add_argument("--max-queue", type=flags.integer(0), default=Settings.max_queue,
                   help="generations waiting for a slot; past it requests get RESOURCE_EXHAUSTED")
    p.add_argument("--engine-retry", type=flags.seconds(), default=Settings.engine_retry_s,
                   help="seconds an engine call retries an unreachable or overloaded engine")
    p.add_argument("--redis-retry", type=flags.seconds(), default=30,
                   help="seconds a running session's writes wait for Redis to come back")
    p.add_argument("--lease", type=flags.seconds(MIN_LEASE_S), default=10,
                   help="seconds without renewal after which another replica may take a session over")
    p.add_argument("--session-ttl", type=flags.integer(1, flags.YEAR_S), default=24 * 3600,
                   help="seconds a finished session stays in the store (a running one: a day past its last span)")
    p.add_argument("--engine-wait", type=flags.seconds(0, low_open=True), default=120,
                   help="seconds to wait for the engines at start-up")
    p.add_argument("--workers", type=flags.integer(0), default=0,
                   help="gRPC worker threads, and as many for the HTTP API's generations (0: max sessions + "
                        "max queue + 16 for the other calls)")
    add_server_tls_args(p)
    add_client_tls_args(p, "engine-", "the engines")
    add_auth_args(p)
    telemetry.add_telemetry_args(p)
    return p


def parse_args(argv=None, parser: flags.Parser | None = None):
    """The flags, checked alone and together; parser: make_parser()'s, to parse many argument lists."""
    p = parser or make_parser()
    args = p.parse_args(argv)
    check_combinations(p, args)
    args.workers = args.workers or args.max_sessions + args.max_queue + 16  # 16: the calls that are not generations
    args.credentials, args.token = server_credentials_from_args(p, args), token_from_args(p, args)
    args.interceptors = [BearerTokenInterceptor(args.token)] if args.token is not None else []
    args.engine_tls = client_tls_from_args(p, args, "engine-")
    return args


def check_combinations(parser, args) -> None:
    """The rules between flags; each flag's own range is its type's."""
    flags.check_ports_differ(parser, args)
    if args.http_port and args.http_port in (args.port, args.metrics_port):
        taken = "--port" if args.http_port == args.port else "--metrics-port"
        parser.error(f"argument --http-port: {args.http_port} is {taken} already; the HTTP API needs a port of its own")
    if args.max_new_tokens > args.max_new_tokens_limit:
        parser.error(f"argument --max-new-tokens: {args.max_new_tokens} is above --max-new-tokens-limit "
                     f"{args.max_new_tokens_limit}; requests that ask for no length would all be refused")


def read_router(path: str | None) -> bytes:
    """The --router file's bytes; without one, the committed router if it is there."""
    if path is not None:
        return Path(path).read_bytes()
    default = default_router_path()
    return default.read_bytes() if default.exists() else b""


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s orchestrator %(levelname)s %(message)s")
    telemetry.setup_tracing("rstitch-orchestrator")  # before the engine clients: their channels carry the context
    store = open_store(args)
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
    # Engines that do not answer (ConnectionError) or fail a call (EngineError), engines that do not
    # pair, a router file gone since parsing (OSError).
    except (OSError, ValueError, EngineError) as e:
        flags.exit_on_failure("orchestrator", e)
    http = start_http(args, orchestrator) if args.http_port is not None else None
    try:
        server, port = start_server(
            lambda s: orchestrator_pb2_grpc.add_OrchestratorServicer_to_server(OrchestratorServicer(orchestrator), s),
            [SERVICE_NAME], args.host, args.port, args.workers,
            args.credentials, args.interceptors,
        )
    except (OSError, RuntimeError) as e:  # grpcio itself raises RuntimeError where it cannot bind
        flags.exit_on_failure("orchestrator", f"{e} (--host {args.host}, --port {args.port})")
    try:
        telemetry.serve_metrics(args.host, args.metrics_port, OrchestratorCollector(orchestrator))
    except OSError as e:
        flags.exit_on_failure("orchestrator", e)
    logging.info("serving orchestrator on %s:%d", args.host, port)
    serve_until_signalled(server, also_stop=[http.stop] if http is not None else [])


def start_http(args, orchestrator: Orchestrator):
    """The OpenAI-compatible API on --http-port, serving once this returns; its generations get as many
    threads as the gRPC server's calls (--workers)."""
    from .http_api.app import create_app
    from .http_api.server import HttpServer

    executor = ThreadPoolExecutor(args.workers, thread_name_prefix="http-generation")
    app = create_app(orchestrator, executor, args.token)
    try:
        http = HttpServer(app, args.host, args.http_port, args.tls_cert, args.tls_key, args.tls_client_ca)
        http.start()
    except (OSError, RuntimeError) as e:  # a port in use; TLS files that make no context (ssl.SSLError)
        flags.exit_on_failure("orchestrator", f"cannot serve HTTP on {args.host}:{args.http_port}: "
                                              f"{getattr(e, 'strerror', None) or e} (--http-port)")
    logging.info("serving the OpenAI-compatible API on http%s://%s:%d/v1", "s" if args.tls_cert else "",
                 args.host, http.port)
    return http


def open_store(args):
    """The session store: Redis, answering now, or this process's memory."""
    if not args.redis:
        logging.warning("no --redis given: sessions live in this process only and are lost when it stops")
        return MemorySessionStore(ttl_s=args.session_ttl, lease_s=args.lease)
    from redis import RedisError

    store = RedisSessionStore(args.redis, retry_s=args.redis_retry, ttl_s=args.session_ttl, lease_s=args.lease)
    try:
        store.ping()
    except StoreUnavailable as e:  # unreachable, or a refused password or certificate
        flags.exit_on_failure("orchestrator", f"{e} (--redis)")
    except RedisError as e:  # an answer to a connection Redis does not take: a database number past its count
        flags.exit_on_failure("orchestrator", f"Redis at {store.url} refused the connection: {e} (--redis)")
    return store


if __name__ == "__main__":
    main()
