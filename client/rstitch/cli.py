"""The `rstitch` command line: generate against an orchestrator, inspect a session, or run the demo.

Whatever it is given, it answers with a result or one line on stderr, never a traceback: a mistake
in the arguments is an argparse-style error (exit 2), an error from the server `rstitch: CODE:
message` (exit 1), Ctrl-C exit 130.
"""

import argparse
import json
import os
import re
import sys
import tempfile
import time

import grpc

from .client import (
    DEFAULT_RETRY_S,
    MAX_STOP_CHARS,
    MAX_STOP_STRINGS,
    MAX_TOP_LOGPROBS,
    POLICIES,
    OptionNotForPolicy,
    RStitchClient,
    check_policy_options,
)
from .security import add_client_tls_args, add_token_arg, client_tls_from_args

LLM_STYLE, RESET = "\033[1;33m", "\033[0m"  # bold yellow: written by the LLM
DEMO_PROMPT = "(47+38)*6-19"  # the default pair is trained on step-by-step arithmetic
ORCHESTRATOR_ENV, DEFAULT_ORCHESTRATOR = "RSTITCH_ORCHESTRATOR", "127.0.0.1:50050"
UINT32_MAX, UINT64_MAX = 2**32 - 1, 2**64 - 1  # the proto's integer fields
MAX_TIMEOUT_S = 10**9  # grpc's deadlines (64-bit nanoseconds) overflow about 7e9 s from now
MAX_ROUTER_BYTES = 1 << 20  # GenerationSpec.router's limit
# What str.splitlines breaks at: escaped in error messages, which thus stay on one line.
LINE_BREAKS = {ord(c): c.encode("unicode_escape").decode() for c in "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"}


def one_line(text: str) -> str:
    return text.translate(LINE_BREAKS)


def shown(text: str) -> str:
    """text as an error message quotes it: repr (escapes and surrogates visible), shortened."""
    quoted = repr(text)
    return quoted if len(quoted) <= 60 else quoted[:56] + "...'"


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: no usage block, and no line break from the arguments themselves."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")

    def _get_values(self, action, arg_strings):
        # Python 3.11's argparse takes the value of `--flag=--` for the end-of-options marker, drops
        # it and returns [] without calling the flag's type; give "--" to the type like any value.
        if action.option_strings and action.nargs is None and arg_strings == ["--"]:
            value = self._get_value(action, "--")
            self._check_value(action, value)
            return value
        return super()._get_values(action, arg_strings)


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Appends an option's default to its help, unless it has none to show or the help names it already."""

    def _get_help_string(self, action):
        help_text = action.help or ""
        has_default = action.default is not None and action.default is not False and action.default != argparse.SUPPRESS
        if action.option_strings and has_default and "default" not in help_text:
            help_text += " (default: %(default)s)"
        return help_text


# --- argument types: each refuses a bad value with a message argparse puts after "argument --NAME:" ----


def integer_in(lowest: int, highest: int):
    def integer(text: str) -> int:
        try:
            value = int(text)
        except ValueError:  # not a number, or too many digits to convert
            value = None
        if value is None or not lowest <= value <= highest:
            raise argparse.ArgumentTypeError(f"{shown(text)} is not an integer in [{lowest}, {highest}]")
        return value
    return integer


def number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{shown(text)} is not a number") from None


def fraction(text: str) -> float:
    value = number(text)
    if not 0.0 <= value <= 1.0:  # NaN fails too
        raise argparse.ArgumentTypeError(f"{shown(text)} is not a number in [0, 1]")
    return value


def non_negative(text: str) -> float:
    value = number(text)
    if not 0.0 <= value < float("inf"):  # NaN fails too
        raise argparse.ArgumentTypeError(f"{shown(text)} is not a number >= 0")
    return value


def probability(text: str) -> float:
    value = number(text)
    if not 0.0 < value <= 1.0:  # NaN fails too
        raise argparse.ArgumentTypeError(f"{shown(text)} is not a number in (0, 1]")
    return value


def stop_string(text: str) -> str:
    if not nonempty_text(text) or len(text) > MAX_STOP_CHARS:
        raise argparse.ArgumentTypeError(f"{shown(text)} is not 1 to {MAX_STOP_CHARS} characters")
    return text


def seconds(text: str) -> float:
    value = number(text)
    if not 0.0 < value <= MAX_TIMEOUT_S:
        raise argparse.ArgumentTypeError(f"{shown(text)} is not a number of seconds in (0, {MAX_TIMEOUT_S}]")
    return value


def utf8(text: str) -> str:
    """Text that is valid Unicode: a shell passes bytes that are not UTF-8 as lone surrogates."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise argparse.ArgumentTypeError(f"is not valid UTF-8 (character {e.start} of {shown(text)})") from None
    return text


def nonempty_text(text: str) -> str:
    if not utf8(text):
        raise argparse.ArgumentTypeError("is empty")
    return text


def address(text: str) -> str:
    """A gRPC target without spaces or control characters, which grpc would refuse only later, with
    its own log on stderr, or not at all."""
    if not utf8(text) or any(c.isspace() or not c.isprintable() for c in text):
        raise argparse.ArgumentTypeError(f"{shown(text)} is not an address like HOST:PORT "
                                         "(no spaces or control characters)")
    return text


def chat_message(text: str) -> dict:
    role, colon, content = utf8(text).partition(":")
    if not colon or not role or any(c.isspace() for c in role):
        raise argparse.ArgumentTypeError(f"{shown(text)} is not ROLE:CONTENT (e.g. user:Hello)")
    return {"role": role, "content": content}


# --- commands -----------------------------------------------------------------------------------------


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
    options = generation_options(args)
    printer = None if args.json else TextPrinter(sys.stdout.isatty())
    with connect(args) as client:
        result = client.generate(**options, on_text=printer)
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        print()  # the text itself was printed as it arrived
        print(summary(result), file=sys.stderr)
    return 0


class TextPrinter:
    """Prints each piece of the answer as it arrives, the LLM's highlighted in a terminal."""

    def __init__(self, color: bool):
        self.color = color

    def __call__(self, source: str, text: str) -> None:
        sys.stdout.write(f"{LLM_STYLE}{text}{RESET}" if self.color and source == "llm" else text)
        sys.stdout.flush()


def generation_options(args) -> dict:
    """RStitchClient.generate's keyword arguments; what does not fit together is an argparse error."""
    parser = args.parser
    if args.messages and args.prompt is not None:
        parser.error("argument --message: not allowed with a PROMPT")
    if not args.messages and args.prompt is None:
        parser.error("give a PROMPT or --message ROLE:CONTENT")
    if args.raw and (args.token_ids or args.messages):
        parser.error("argument --raw: applies to a text PROMPT only")
    if args.stop and len(args.stop) > MAX_STOP_STRINGS:
        parser.error(f"argument --stop: at most {MAX_STOP_STRINGS} stop strings, got {len(args.stop)}")
    knobs = dict(tau=args.tau, slm_probability=args.slm_probability, draft_tokens=args.draft_tokens)
    try:
        check_policy_options(args.policy, router=args.router, **knobs)
    except OptionNotForPolicy as e:
        parser.error(f"argument --{e.option.replace('_', '-')}: applies to --policy {' and '.join(e.policies)} "
                     f"only, not {e.policy}")
    prompt = token_ids(parser, args.prompt) if args.token_ids else args.prompt
    router = read_router(parser, args.router) if args.router is not None else None
    return dict(prompt=prompt, messages=args.messages, policy=args.policy, max_new_tokens=args.max_new_tokens,
                raw=args.raw, stop_token_ids=args.stop_token_ids or (), router=router, seed=args.seed,
                temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                stop=args.stop or (), logprobs=args.logprobs, **knobs)


def token_ids(parser, text: str) -> list[int]:
    ids = [t for t in re.split(r"[,\s]+", text) if t]
    if not ids:
        parser.error(f"argument --token-ids: PROMPT {shown(text)} holds no token ids")
    for t in ids:
        if not re.fullmatch(r"[0-9]{1,10}", t) or int(t) > UINT32_MAX:
            parser.error(f"argument --token-ids: {shown(t)} in PROMPT is not a token id (an integer in "
                         f"[0, {UINT32_MAX}]; separate ids by commas and/or whitespace)")
    return [int(t) for t in ids]


def read_router(parser, path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_ROUTER_BYTES + 1)  # bounded: the path may name something endless
    except (OSError, ValueError) as e:  # ValueError: a NUL in the path
        parser.error(f"argument --router: cannot read {shown(path)}: {getattr(e, 'strerror', None) or e}")
    if not data or len(data) > MAX_ROUTER_BYTES:
        parser.error(f"argument --router: {shown(path)} has {len(data) if data else 0} bytes; a router file "
                     f"has 1 to {MAX_ROUTER_BYTES}")
    return data


def cmd_session(args) -> int:
    from google.protobuf import json_format

    with connect(args) as client:
        print(json_format.MessageToJson(client.session(args.session_id)))
    return 0


def cmd_demo(args) -> int:
    from .local import LocalDeployment

    print("starting the SLM engine, the LLM engine and the orchestrator...", file=sys.stderr)
    started = time.monotonic()
    log_dir = tempfile.mkdtemp(prefix="rstitch-demo-logs-")
    try:
        deployment = LocalDeployment(log_dir=log_dir)
    except (RuntimeError, TimeoutError) as e:  # a service exited or never became healthy
        print(f"rstitch: the demo deployment did not start: {one_line(str(e).splitlines()[0])} "
              f"(the services' logs are in {log_dir})", file=sys.stderr)
        return 1
    with deployment:
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
    return RStitchClient(args.orchestrator, timeout=args.timeout, tls=args.tls, token=args.token, retry_s=args.retry)


def resolve_connection_args(args) -> None:
    """The orchestrator's address (flag, else $RSTITCH_ORCHESTRATOR, else the default), the token and
    TLS, checked before anything connects."""
    parser = args.parser
    if args.orchestrator is None:
        from_env = os.environ.get(ORCHESTRATOR_ENV)
        try:
            args.orchestrator = address(from_env) if from_env else DEFAULT_ORCHESTRATOR
        except argparse.ArgumentTypeError as e:
            parser.error(f"${ORCHESTRATOR_ENV}: {e}")
    # grpc sends the token in a header, which holds printable ASCII only; the token itself is not echoed.
    if args.token is not None and not re.fullmatch(r"[\x20-\x7e]+", args.token):
        parser.error("argument --token (or $RSTITCH_TOKEN): is empty or holds characters other than printable ASCII")
    args.tls = client_tls_from_args(parser, args)


def add_connection_args(parser: argparse.ArgumentParser, timeout: float) -> None:
    parser.add_argument("--orchestrator", type=address, metavar="ADDRESS",
                        help=f"HOST:PORT, or any gRPC target such as ipv4:HOST:PORT,HOST:PORT "
                             f"(default: ${ORCHESTRATOR_ENV}, else {DEFAULT_ORCHESTRATOR})")
    parser.add_argument("--timeout", type=seconds, default=timeout, metavar="SECONDS",
                        help="deadline of the call (of a generation: re-attaches included)")
    parser.add_argument("--retry", type=non_negative, default=DEFAULT_RETRY_S, metavar="SECONDS",
                        help="how long to keep retrying, with backoff, while no orchestrator can serve the call (one "
                             "restarting, a failover to another replica); a broken generation is re-attached, never "
                             "run twice. 0: fail at once")
    add_client_tls_args(parser, what="the orchestrator")
    add_token_arg(parser)


def add_generate_parser(sub) -> None:
    g = sub.add_parser("generate", help="run one generation on an orchestrator", formatter_class=DefaultsHelpFormatter,
                       description="Run one generation. An option that does not apply to the chosen --policy is "
                                   "refused: --tau (entropy, router), --slm-probability (random), "
                                   "--draft-tokens (spec), --router (router).")
    g.add_argument("prompt", nargs="?", type=nonempty_text,
                   help="text (through the chat template when the model has one), or ids with --token-ids")
    add_connection_args(g, timeout=300)
    g.add_argument("--policy", choices=list(POLICIES), default="entropy", help="who writes which token (README)")
    g.add_argument("--tau", type=fraction, help="entropy and router policies: the normalized-entropy threshold "
                                               "in [0, 1] (default: the orchestrator's --tau)")
    g.add_argument("--slm-probability", type=fraction,
                   help="random policy: the chance in [0, 1] that a token goes to the SLM (default: 0.5)")
    g.add_argument("--seed", type=integer_in(0, UINT64_MAX),
                   help="seed of every random draw (sampled tokens, random routing, speculative acceptance); the "
                        "same seed gives the same answer (default: the server picks one)")
    g.add_argument("--temperature", type=non_negative,
                   help="sampling temperature >= 0; 0 is greedy decoding (default: 0)")
    g.add_argument("--top-p", type=probability, help="nucleus sampling: keep the most likely tokens up to this "
                                                     "much probability, in (0, 1] (default: 1, all)")
    g.add_argument("--top-k", type=integer_in(0, UINT32_MAX), help="sample among the k most likely tokens "
                                                                   "(default: 0, all)")
    g.add_argument("--min-p", type=fraction, help="keep tokens at least this fraction as likely as the most likely "
                                                  "one, in [0, 1] (default: 0)")
    g.add_argument("--stop", dest="stop", action="append", type=stop_string, metavar="TEXT",
                   help=f"a string that ends the answer (finish reason stop; not part of the text); repeatable, "
                        f"at most {MAX_STOP_STRINGS} of at most {MAX_STOP_CHARS} characters")
    g.add_argument("--logprobs", type=integer_in(0, MAX_TOP_LOGPROBS), metavar="N",
                   help="with --json: each token's log-probability and its N most likely alternatives'")
    g.add_argument("--draft-tokens", type=integer_in(0, UINT32_MAX),
                   help="spec policy: tokens drafted per verification (default: 4)")
    g.add_argument("--router", metavar="FILE",
                   help="router policy: a router file (default: the orchestrator's, the committed trained one)")
    g.add_argument("--max-new-tokens", type=integer_in(0, UINT32_MAX), default=0,
                   help="most answer tokens; 0: the orchestrator's --max-new-tokens")
    g.add_argument("--stop-token-id", dest="stop_token_ids", action="append", type=integer_in(0, UINT32_MAX),
                   metavar="ID", help="a token id that ends the answer (finish reason stop); repeatable. The "
                                      "model's EOS ids always end it (finish reason eos)")
    prompt_kind = g.add_mutually_exclusive_group()
    prompt_kind.add_argument("--token-ids", action="store_true",
                             help="PROMPT is token ids, separated by commas and/or whitespace")
    prompt_kind.add_argument("--message", dest="messages", action="append", type=chat_message,
                             metavar="ROLE:CONTENT", help="a chat message instead of a PROMPT; repeatable, in order")
    g.add_argument("--raw", action="store_true", help="tokenize a text PROMPT without the chat template")
    g.add_argument("--json", action="store_true", help="print one JSON object (ids, sources, entropies, stats)")
    g.set_defaults(func=cmd_generate, parser=g)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="rstitch", description="R-Stitch: SLM/LLM stitched decoding as a service.",
               formatter_class=DefaultsHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    add_generate_parser(sub)

    s = sub.add_parser("session", help="show a session as the orchestrator's store holds it",
                       formatter_class=DefaultsHelpFormatter)
    s.add_argument("session_id", type=nonempty_text)
    add_connection_args(s, timeout=30)
    s.set_defaults(func=cmd_session, parser=s)

    d = sub.add_parser("demo", help="start everything locally, run one stitched generation, stop",
                       formatter_class=DefaultsHelpFormatter)
    d.add_argument("--prompt", type=nonempty_text, default=DEMO_PROMPT, help="what to ask the trained pair")
    d.add_argument("--tau", type=fraction, help="entropy threshold in [0, 1] (default: the orchestrator's)")
    d.add_argument("--max-new-tokens", type=integer_in(0, UINT32_MAX), default=64, help="most answer tokens")
    d.set_defaults(func=cmd_demo, parser=d)
    return p


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.command != "demo":  # the commands that connect to an orchestrator
            resolve_connection_args(args)
        return args.func(args)
    except grpc.RpcError as e:
        print(f"rstitch: {e.code().name}: {one_line(e.details() or '')}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
