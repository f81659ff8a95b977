"""The `rstitch` command line: generate against an orchestrator, inspect a session, or run the demo."""

import argparse
import json
import sys
import time
from pathlib import Path

import grpc

from .client import POLICIES, RStitchClient
from .security import add_client_tls_args, add_token_arg, client_tls_from_args

LLM_STYLE, RESET = "\033[1;33m", "\033[0m"  # bold yellow: written by the LLM
DEMO_PROMPT = "(47+38)*6-19"  # the default pair is trained on step-by-step arithmetic


def render(result, color: bool) -> str:
    if not color:
        return result.text
    return "".join(f"{LLM_STYLE}{text}{RESET}" if source == "llm" else text for source, text in result.pieces)


def summary(result) -> str:
    s = result.stats
    total = s["slm_tokens"] + s["llm_tokens"]
    share = 100 * s["llm_tokens"] / total if total else 0.0
    return (f"{total} tokens: {s['slm_tokens']} SLM, {s['llm_tokens']} LLM ({share:.0f}%), {s['switches']} switches, "
            f"{s['latency_ms']:.0f} ms, finished by {result.finish_reason}; session {result.session_id}")


def cmd_generate(args) -> int:
    prompt = [int(t) for t in args.prompt.split(",")] if args.token_ids else args.prompt
    if args.router and args.policy != "router":
        raise SystemExit("rstitch: --router is for --policy router")
    try:
        router = args.router.read_bytes() if args.router else b""
    except OSError as e:
        raise SystemExit(f"rstitch: cannot read --router {args.router}: {e.strerror}") from None
    with connect(args) as client:
        result = client.generate(prompt, policy=args.policy, tau=args.tau, max_new_tokens=args.max_new_tokens,
                                 raw=args.raw, slm_probability=args.slm_probability, seed=args.seed,
                                 draft_tokens=args.draft_tokens, router=router)
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        print(render(result, sys.stdout.isatty()))
        print(summary(result), file=sys.stderr)
    return 0


def cmd_session(args) -> int:
    from google.protobuf import json_format

    with connect(args) as client:
        print(json_format.MessageToJson(client.session(args.session_id)))
    return 0


def cmd_demo(args) -> int:
    from .local import LocalDeployment

    print("starting the SLM engine, the LLM engine and the orchestrator...", file=sys.stderr)
    started = time.monotonic()
    with LocalDeployment() as deployment:
        store = deployment.redis_url or "an in-process store (no redis-server found, REDIS_URL unset)"
        print(f"up in {time.monotonic() - started:.1f} s; orchestrator at {deployment.address}, sessions in {store}",
              file=sys.stderr)
        with RStitchClient(deployment.address) as client:
            result = client.generate(args.prompt, policy="entropy", tau=args.tau, max_new_tokens=args.max_new_tokens)
    color = sys.stdout.isatty()
    print(f"\nprompt: {args.prompt}\n")
    print(render(result, color))
    legend = f"{LLM_STYLE}LLM{RESET}" if color else "LLM"
    print(f"\n({legend}-written tokens highlighted when printed to a terminal) {summary(result)}")
    return 0


def connect(args) -> RStitchClient:
    return RStitchClient(args.orchestrator, timeout=args.timeout, tls=args.tls, token=args.token)


def add_connection_args(parser: argparse.ArgumentParser, timeout: float) -> None:
    parser.add_argument("--orchestrator", default="127.0.0.1:50050", help="HOST:PORT")
    parser.add_argument("--timeout", type=float, default=timeout, help="deadline in seconds")
    add_client_tls_args(parser, what="the orchestrator")
    add_token_arg(parser)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rstitch", description="R-Stitch: SLM/LLM stitched decoding as a service.")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="run one generation on an orchestrator")
    g.add_argument("prompt", help="text (chat template applied when the model has one), or ids with --token-ids")
    add_connection_args(g, timeout=300)
    g.add_argument("--policy", choices=list(POLICIES), default="entropy")
    g.add_argument("--tau", type=float, help="entropy threshold in [0, 1] (default: the server's)")
    g.add_argument("--slm-probability", type=float, help="random policy: chance a token goes to the SLM (default 0.5)")
    g.add_argument("--seed", type=int, default=0, help="random policy: seed of the routing draws")
    g.add_argument("--draft-tokens", type=int, default=0, help="spec policy: tokens drafted per verification (0: 4)")
    g.add_argument("--router", type=Path,
                   help="router policy: a router file to use (default: the orchestrator's, the committed trained one)")
    g.add_argument("--max-new-tokens", type=int, default=0, help="0: the server's default")
    g.add_argument("--token-ids", action="store_true", help="PROMPT is comma-separated token ids")
    g.add_argument("--raw", action="store_true", help="tokenize the text without the chat template")
    g.add_argument("--json", action="store_true", help="print one JSON object (ids, sources, entropies, stats)")
    g.set_defaults(func=cmd_generate)

    s = sub.add_parser("session", help="show a session as the orchestrator's store holds it")
    s.add_argument("session_id")
    add_connection_args(s, timeout=30)
    s.set_defaults(func=cmd_session)

    d = sub.add_parser("demo", help="start everything locally, run one stitched generation, stop")
    d.add_argument("--prompt", default=DEMO_PROMPT)
    d.add_argument("--tau", type=float, help="entropy threshold (default: the orchestrator's)")
    d.add_argument("--max-new-tokens", type=int, default=64)
    d.set_defaults(func=cmd_demo)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "demo":  # the commands that connect to an orchestrator
        args.tls = client_tls_from_args(parser, args)
    try:
        return args.func(args)
    except grpc.RpcError as e:
        print(f"rstitch: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
