"""The rstitch CLI: every invocation gives a working result or one clear line, never a traceback.

Run in-process through rstitch.cli.main: a table of bad invocations; a fuzzer over the full range of
every option (negative and huge integers, NaN and infinite floats, any unicode with lone surrogates,
empty strings) against no server, where a valid invocation reaches the connect step and fails there
with one UNAVAILABLE line; and end-to-end runs against a real deployment of the tiny pair.
"""

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rstitch import OptionNotForPolicy, RStitchClient, make_spec
from rstitch.cli import build_parser, main
from rstitch.local import LocalDeployment

from .test_security import make_cert

REFUSED = "127.0.0.1:1"  # nothing listens on port 1: a connection is refused at once
UINT32_MAX, UINT64_MAX = 2**32 - 1, 2**64 - 1
POLICIES = ["entropy", "llm", "slm", "random", "spec", "router"]
APPLIES_TO = {"--tau": {"entropy", "router"}, "--slm-probability": {"random"}, "--draft-tokens": {"spec"},
              "--router": {"router"}}
CLIENT_ENV = ("RSTITCH_ORCHESTRATOR", "RSTITCH_TOKEN")
FUZZ = settings(derandomize=True, database=None, deadline=None, print_blob=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@dataclass
class Outcome:
    code: int
    stdout: str
    stderr: str

    @property
    def line(self) -> str:
        """stderr, which must be exactly one line."""
        lines = self.stderr.splitlines()
        assert len(lines) == 1, f"stderr is not one line: {self.stderr!r}"
        return lines[0]


class DeploymentReached(Exception):
    """Raised by the stand-in for LocalDeployment: `rstitch demo` got as far as starting the services."""


def run_cli(*argv: str, env: dict | None = None, retry_s: float = 0) -> Outcome:
    """main(argv) in this process, with the client's variables of the environment replaced by env, and
    retry_s the default of --retry (most tests reach the connect step against no server, where the real
    default would retry for 30 s). Any exception but SystemExit escapes, failing the test: that would be a
    traceback for a user."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with mock.patch.dict(os.environ), contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr), \
            mock.patch("rstitch.cli.DEFAULT_RETRY_S", retry_s):
        for name in CLIENT_ENV:
            os.environ.pop(name, None)
        os.environ.update(env or {})
        try:
            code = main(list(argv))
        except SystemExit as e:
            code = e.code
    return Outcome(code, stdout.getvalue(), stderr.getvalue())


def assert_usage_error(outcome: Outcome, *names: str) -> None:
    """Exit 2 and one argparse-style line naming one of `names` (any name when none is given)."""
    assert outcome.code == 2, outcome
    assert re.match(r"rstitch( \w+)?: error: ", outcome.line), outcome.line
    assert not names or any(name in outcome.line for name in names), (names, outcome.line)


def assert_unavailable(outcome: Outcome, codes=("UNAVAILABLE",)) -> None:
    """Exit 1 and one `rstitch: CODE: message` line: the invocation was valid and reached the connect step."""
    assert outcome.code == 1, outcome
    assert re.match(rf"rstitch: ({'|'.join(codes)}): ", outcome.line), outcome.line


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Files the options can name: a router file (the client sends any bytes), unusable ones, and a CA
    certificate and a client certificate with its key (no TLS handshake is ever made with them)."""
    d = tmp_path_factory.mktemp("cli-files")
    make_cert(d, "client", make_cert(d, "ca", ca=True))
    paths = {"router": d / "router.safetensors", "empty": d / "empty", "big": d / "big", "ca": d / "ca.pem",
             "cert": d / "client.pem", "key": d / "client.key", "dir": d, "missing": d / "missing"}
    paths["router"].write_bytes(b"r" * 100)
    paths["empty"].write_bytes(b"")
    paths["big"].write_bytes(b"r" * ((1 << 20) + 1))
    return {name: str(path) for name, path in paths.items()}


# --- the table: bad invocations are one line naming the option, exit 2 ------------------------------

BAD_GENERATE = {
    "seed -1": (["--policy", "random", "--seed", "-1", "hi"], "--seed"),
    "seed 2**64": (["--policy", "random", "--seed", str(2**64), "hi"], "--seed"),
    "seed text": (["--policy", "random", "--seed", "seven", "hi"], "--seed"),
    "max-new-tokens -1": (["--max-new-tokens", "-1", "hi"], "--max-new-tokens"),
    "max-new-tokens 2**32": (["--max-new-tokens", str(2**32), "hi"], "--max-new-tokens"),
    "max-new-tokens 10**5000": (["--max-new-tokens", "9" * 5000, "hi"], "--max-new-tokens"),
    "draft-tokens 1.5": (["--policy", "spec", "--draft-tokens", "1.5", "hi"], "--draft-tokens"),
    "stop-token-id -1": (["--stop-token-id", "-1", "hi"], "--stop-token-id"),
    "stop-token-id 2**32": (["--stop-token-id", str(2**32), "hi"], "--stop-token-id"),
    "tau nan": (["--tau", "nan", "hi"], "--tau"),
    "tau inf": (["--tau", "inf", "hi"], "--tau"),
    "tau 1.5": (["--tau", "1.5", "hi"], "--tau"),
    "tau empty": (["--tau", "", "hi"], "--tau"),
    "slm-probability -0.1": (["--policy", "random", "--slm-probability", "-0.1", "hi"], "--slm-probability"),
    "slm-probability 2": (["--policy", "random", "--slm-probability", "2", "hi"], "--slm-probability"),
    "timeout 0": (["--timeout", "0", "hi"], "--timeout"),
    "timeout -1": (["--timeout", "-1", "hi"], "--timeout"),
    "timeout nan": (["--timeout", "nan", "hi"], "--timeout"),
    "timeout 1e300": (["--timeout", "1e300", "hi"], "--timeout"),
    "retry -1": (["--retry", "-1", "hi"], "--retry"),
    "retry nan": (["--retry", "nan", "hi"], "--retry"),
    "retry inf": (["--retry", "inf", "hi"], "--retry"),
    "policy unknown": (["--policy", "fastest", "hi"], "--policy"),
    "orchestrator empty": (["--orchestrator", "", "hi"], "--orchestrator"),
    "orchestrator space": (["--orchestrator", "127.0.0.1 :50050", "hi"], "--orchestrator"),
    "orchestrator NUL": (["--orchestrator", "127.0.0.1:1\x00", "hi"], "--orchestrator"),
    "orchestrator surrogate": (["--orchestrator", "h\udcff:1", "hi"], "--orchestrator"),
    "prompt not UTF-8": (["caf\udce9"], "UTF-8"),
    "prompt empty": ([""], "prompt"),
    "no prompt": ([], "PROMPT"),
    "token-ids word": (["--token-ids", "5 six 7"], "--token-ids"),
    "token-ids negative": (["--token-ids", "5,-6"], "--token-ids"),
    "token-ids 2**32": (["--token-ids", str(2**32)], "--token-ids"),
    "token-ids float": (["--token-ids", "1.0"], "--token-ids"),
    "token-ids only commas": (["--token-ids", ", ,"], "--token-ids"),
    "message without colon": (["--message", "hello"], "--message"),
    "message without role": (["--message", ":hello"], "--message"),
    "message role with space": (["--message", "us er:hello"], "--message"),
    "message not UTF-8": (["--message", "user:\udcff"], "--message"),
    "message and prompt": (["--message", "user:hello", "hi"], "--message"),
    "message and token-ids": (["--token-ids", "--message", "user:hello"], "--message"),
    "raw with token-ids": (["--raw", "--token-ids", "5 6"], "--raw"),
    "raw with message": (["--raw", "--message", "user:hello"], "--raw"),
    "temperature -0.1": (["--temperature", "-0.1", "hi"], "--temperature"),
    "temperature nan": (["--temperature", "nan", "hi"], "--temperature"),
    "temperature inf": (["--temperature", "inf", "hi"], "--temperature"),
    "top-p 0": (["--top-p", "0", "hi"], "--top-p"),
    "top-p 1.5": (["--top-p", "1.5", "hi"], "--top-p"),
    "top-p nan": (["--top-p", "nan", "hi"], "--top-p"),
    "top-k -1": (["--top-k", "-1", "hi"], "--top-k"),
    "top-k 2**32": (["--top-k", str(2**32), "hi"], "--top-k"),
    "min-p -0.5": (["--min-p", "-0.5", "hi"], "--min-p"),
    "min-p 1.5": (["--min-p", "1.5", "hi"], "--min-p"),
    "stop empty": (["--stop", "", "hi"], "--stop"),
    "stop too long": (["--stop", "x" * 257, "hi"], "--stop"),
    "stop too many": ([arg for _ in range(17) for arg in ("--stop", "x")] + ["hi"], "--stop"),
    "logprobs 21": (["--logprobs", "21", "hi"], "--logprobs"),
    "logprobs -1": (["--logprobs", "-1", "hi"], "--logprobs"),
    "tau with random": (["--policy", "random", "--tau", "0.5", "hi"], "--tau"),
    "tau with llm": (["--policy", "llm", "--tau", "0.5", "hi"], "--tau"),
    "slm-probability with entropy": (["--slm-probability", "0.5", "hi"], "--slm-probability"),
    "draft-tokens with router": (["--policy", "router", "--draft-tokens", "4", "hi"], "--draft-tokens"),
    "token empty": (["--token", "", "hi"], "--token"),
    "token newline": (["--token", "a\nb", "hi"], "--token"),
    "token not ASCII": (["--token", "tök", "hi"], "--token"),
    "tls-server-name without TLS": (["--tls-server-name", "orch", "hi"], "--tls-server-name"),
    "tls-cert without key": (["--tls-cert", "{cert}", "hi"], "--tls-cert"),
    "tls-ca missing": (["--tls-ca", "{missing}", "hi"], "missing"),
    "tls-server-name with a space": (["--tls-ca", "{ca}", "--tls-server-name", "a b", "hi"], "--tls-server-name"),
    "router with entropy": (["--router", "{router}", "hi"], "--router"),
    "router missing": (["--policy", "router", "--router", "{missing}", "hi"], "--router"),
    "router empty": (["--policy", "router", "--router", "{empty}", "hi"], "--router"),
    "router a directory": (["--policy", "router", "--router", "{dir}", "hi"], "--router"),
    "router over 1 MiB": (["--policy", "router", "--router", "{big}", "hi"], "--router"),
    "router NUL in path": (["--policy", "router", "--router", "a\x00b", "hi"], "--router"),
    "unknown option": (["--bogus", "hi"], "--bogus"),
}


@pytest.mark.parametrize("args, name", BAD_GENERATE.values(), ids=BAD_GENERATE.keys())
def test_bad_generate_invocations_are_one_line_naming_the_option(args, name, files):
    args = [a.format(**files) if a.startswith("{") else a for a in args]
    assert_usage_error(run_cli("generate", "--orchestrator", REFUSED, *args), name)


BAD_OTHERS = {
    "no command": ([], "command"),
    "unknown command": (["fly"], "fly"),
    "session id empty": (["session", ""], "session_id"),
    "session id not UTF-8": (["session", "\udcff"], "session_id"),
    "session timeout inf": (["session", "--timeout", "inf", "abc"], "--timeout"),
    "demo tau 2": (["demo", "--tau", "2"], "--tau"),
    "demo prompt empty": (["demo", "--prompt", ""], "--prompt"),
    "demo max-new-tokens -5": (["demo", "--max-new-tokens", "-5"], "--max-new-tokens"),
}


@pytest.mark.parametrize("args, name", BAD_OTHERS.values(), ids=BAD_OTHERS.keys())
def test_bad_session_and_demo_invocations_are_one_line(args, name):
    assert_usage_error(run_cli(*args), name)


def test_a_bad_orchestrator_address_in_the_environment_is_named():
    assert_usage_error(run_cli("generate", "hi", env={"RSTITCH_ORCHESTRATOR": "no such host"}),
                       "$RSTITCH_ORCHESTRATOR")


GOOD_WITHOUT_SERVER = {
    "token-ids with spaces": ["--token-ids", "5 6 7"],
    "token-ids with commas and spaces": ["--token-ids", "5, 6,7\t8"],
    "messages": ["--message", "system:Be brief.", "--message", "user:What is 7*8?", "--message", "assistant:"],
    "stop-token-ids at the ends of the range": ["--stop-token-id", "0", "--stop-token-id", str(UINT32_MAX), "hi"],
    "random with every knob": ["--policy", "random", "--seed", str(UINT64_MAX), "--slm-probability", "1", "hi"],
    "sampled with every knob": ["--temperature", "0.6", "--top-p", "0.95", "--top-k", "40", "--min-p", "0.05",
                                "--seed", "7", "--stop", "A:", "--stop", ";", "--logprobs", "20", "hi"],
    "spec with draft-tokens": ["--policy", "spec", "--draft-tokens", str(UINT32_MAX), "hi"],
    "router with a file": ["--policy", "router", "--tau", "0", "--router", "{router}", "hi"],
    "llm without knobs": ["--policy", "llm", "--max-new-tokens", str(UINT32_MAX), "hi"],
    "the longest timeout": ["--timeout", "1e9", "hi"],
    "a prompt that looks like an option": ["--", "-5"],
    "TLS and a token": ["--tls-ca", "{ca}", "--tls-cert", "{cert}", "--tls-key", "{key}", "--tls-server-name",
                        "orchestrator.example", "--token", "s3cret", "hi"],
}


@pytest.mark.parametrize("args", GOOD_WITHOUT_SERVER.values(), ids=GOOD_WITHOUT_SERVER.keys())
def test_valid_invocations_reach_the_connect_step(args, files):
    args = [a.format(**files) if a.startswith("{") else a for a in args]
    assert_unavailable(run_cli("generate", "--orchestrator", REFUSED, *args))


def test_session_reaches_the_connect_step():
    assert_unavailable(run_cli("session", "--orchestrator", REFUSED, "0123abcd"))


def test_with_no_orchestrator_generate_retries_for_retry_seconds_then_says_so():
    started = time.monotonic()
    outcome = run_cli("generate", "--orchestrator", REFUSED, "--retry", "1", "hi", retry_s=30)
    assert 1 <= time.monotonic() - started < 4
    assert_unavailable(outcome)
    assert re.search(r"\(gave up after 1\.\d s of retries; session [0-9a-f]{32}\)$", outcome.line), outcome.line


def test_ctrl_c_exits_130_without_a_traceback():
    with mock.patch.object(RStitchClient, "generate", side_effect=KeyboardInterrupt):
        outcome = run_cli("generate", "--orchestrator", REFUSED, "hi")
    assert (outcome.code, outcome.stderr) == (130, "")


def test_a_demo_deployment_that_does_not_start_is_one_line():
    failure = RuntimeError("python -m slm_service --port 5 exited with 1:\nTraceback (most recent call last):\n...")
    with mock.patch("rstitch.local.LocalDeployment", side_effect=failure):
        outcome = run_cli("demo")
    assert outcome.code == 1
    assert outcome.stderr.splitlines()[-1].startswith("rstitch: the demo deployment did not start: python -m")
    assert "Traceback" not in outcome.stderr


def cli_process(*args: str | bytes) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in CLIENT_ENV}
    return subprocess.run([sys.executable, "-m", "rstitch.cli", *args], capture_output=True, timeout=60, env=env)


def test_a_real_process_writes_one_line_for_bytes_a_shell_may_pass():
    """What a user's terminal shows: the process's whole stderr, grpc's own logs included."""
    for args, code in [(["generate", b"caf\xe9"], 2), (["generate", "--orchestrator", "", "hi"], 2),
                       (["generate", "--orchestrator", REFUSED, "--timeout", "5", "--retry", "1", "hi"], 1)]:
        done = cli_process(*args)
        assert done.returncode == code and len(done.stderr.splitlines()) == 1, (args, done)


# --- --help shows every default ------------------------------------------------------------------------

OFF_UNLESS_GIVEN = {"--tls-ca", "--tls-cert", "--tls-key", "--tls-server-name", "--message", "--stop-token-id", "--stop",
                    "--logprobs"}


def subcommand_parsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {"rstitch": parser, **subparsers.choices}


@pytest.mark.parametrize("name", ["rstitch", "generate", "session", "demo"])
def test_help_shows_the_defaults(name):
    parser = subcommand_parsers()[name]
    assert run_cli(*([] if name == "rstitch" else [name]), "--help").code == 0
    for action in parser._actions:
        takes_value = action.option_strings and action.nargs != 0
        if not takes_value or action.option_strings[0] in OFF_UNLESS_GIVEN:
            continue
        help_text = parser._get_formatter()._expand_help(action)
        assert "default" in help_text, (action.option_strings, help_text)
        if action.default is not None and action.dest != "token":
            assert str(action.default) in help_text, (action.option_strings, help_text)


# --- the fuzzer: the full range of every option, against no server --------------------------------------

ODD_TEXT = ["", " ", "-", "--", "=", "\x00", "\n", "\t", "\udcff", "\ud800", "é", "日本語", "\u202e", "🙂", "\u2028",
            "\x85", "\ufeff", "-1", "0", "1e999", "nan", "user:hi", "a:b:c"]
any_text = st.one_of(st.sampled_from(ODD_TEXT), st.text(st.characters(exclude_categories=()), max_size=12))
integer_text = st.one_of(st.integers(-2**70, 2**70).map(str),
                         st.sampled_from(["0", str(UINT32_MAX), str(2**32), str(UINT64_MAX), str(2**64), "-1", "+3",
                                          " 7 ", "1_000", "٣", "1.0", "0x10", "9" * 5000]),
                         any_text)
number_text = st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr), st.floats(0, 1).map(str),
                        st.sampled_from(["nan", "-nan", "inf", "-inf", "1e999", "-0", "0", "1", "1e9", "1e-320",
                                         "0x1p-2", "1_0", " 0.5 ", "½"]),
                        any_text)


def as_int(text: str, highest: int) -> int | None:
    try:
        value = int(text)
    except ValueError:
        return None
    return value if 0 <= value <= highest else None


def as_number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def is_fraction(text: str) -> bool:
    value = as_number(text)
    return value is not None and 0 <= value <= 1


def is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def is_plain_name(text: str) -> bool:
    return bool(text) and is_utf8(text) and not any(c.isspace() or not c.isprintable() for c in text)


def is_router_file(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return 0 < len(f.read()) <= 1 << 20
    except (OSError, ValueError):
        return False


def is_token_ids(text: str) -> bool:
    ids = [t for t in re.split(r"[,\s]+", text) if t]
    return bool(ids) and all(re.fullmatch("[0-9]{1,10}", t) and int(t) <= UINT32_MAX for t in ids)


def is_message(text: str) -> bool:
    role, colon, _ = text.partition(":")
    return is_utf8(text) and bool(colon) and bool(role) and not any(c.isspace() for c in role)


class Invocation:
    """An argv under construction and the problems an oracle, independent of the CLI, sees in it:
    each the names an error line may give for it (empty: any name)."""

    def __init__(self, draw):
        self.draw, self.argv, self.problems = draw, [], []

    def __repr__(self):
        return f"Invocation(argv={self.argv!r}, problems={self.problems!r})"

    def option(self, flag: str, values, valid) -> str | None:
        """Maybe add `flag=VALUE` (the = form lets a value start with a dash); the value, if added."""
        if not self.draw(st.booleans()):
            return None
        value = self.draw(values)
        self.argv.append(f"{flag}={value}")
        if not valid(value):
            self.problems.append((flag,))
        return value

    def flag(self, flag: str) -> bool:
        given = self.draw(st.booleans())
        if given:
            self.argv.append(flag)
        return given

    def problem(self, *names: str) -> None:
        self.problems.append(names)


def connection_options(inv: Invocation, files: dict) -> None:
    random_address = inv.draw(st.integers(0, 4)) == 0
    address = inv.draw(any_text) if random_address else REFUSED
    inv.argv.append(f"--orchestrator={address}")
    if not is_plain_name(address):
        inv.problem("--orchestrator")
    inv.option("--timeout", number_text, lambda t: (v := as_number(t)) is not None and 0 < v <= 1e9)
    if random_address:  # a name to resolve might take until the deadline: keep it short (the last one wins)
        inv.argv.append("--timeout=0.5")
    inv.option("--retry", number_text, lambda t: (v := as_number(t)) is not None and 0 <= v < float("inf"))
    inv.argv.append("--retry=0")  # no retries against no server (the last one wins)
    # Each TLS flag gets its own file, or one that security.py refuses (what makes a usable PEM file is its business).
    unusable = st.one_of(st.sampled_from([files[k] for k in ("dir", "missing", "empty", "router")]), any_text)
    tls = {k: inv.option(f"--tls-{k}", st.one_of(st.just(files[k]), unusable), lambda p, k=k: p == files[k])
           for k in ("ca", "cert", "key")}
    if (tls["cert"] is None) != (tls["key"] is None):
        inv.problem("--tls-cert", "--tls-key")
    name = inv.option("--tls-server-name", st.one_of(st.just("orchestrator.example"), any_text),
                      lambda n: bool(n) and n.isascii() and n.isprintable() and " " not in n)
    if name is not None and all(p is None for p in tls.values()):
        inv.problem("--tls-server-name")
    inv.option("--token", st.one_of(st.just("s3cret-token"), any_text),
               lambda t: re.fullmatch(r"[\x20-\x7e]+", t) is not None)


@st.composite
def generate_invocations(draw, files):
    inv = Invocation(draw)
    connection_options(inv, files)
    policy = draw(st.one_of(st.sampled_from(POLICIES), any_text)) if draw(st.booleans()) else "entropy"
    inv.argv.append(f"--policy={policy}")
    if policy not in POLICIES:
        inv.problem("--policy")
    given = {"--tau": inv.option("--tau", number_text, is_fraction),
             "--slm-probability": inv.option("--slm-probability", number_text, is_fraction),
             "--draft-tokens": inv.option("--draft-tokens", integer_text, lambda t: as_int(t, UINT32_MAX) is not None),
             "--router": inv.option("--router", st.one_of(st.sampled_from(list(files.values())), any_text),
                                    is_router_file)}
    for flag, value in given.items():
        if value is not None and policy in POLICIES and policy not in APPLIES_TO[flag]:
            inv.problem(flag)
    inv.option("--seed", integer_text, lambda t: as_int(t, UINT64_MAX) is not None)
    inv.option("--temperature", number_text, lambda t: (v := as_number(t)) is not None and 0 <= v < float("inf"))
    inv.option("--top-p", number_text, lambda t: (v := as_number(t)) is not None and 0 < v <= 1)
    inv.option("--top-k", integer_text, lambda t: as_int(t, UINT32_MAX) is not None)
    inv.option("--min-p", number_text, is_fraction)
    inv.option("--logprobs", integer_text, lambda t: as_int(t, 20) is not None)
    for _ in range(draw(st.integers(0, 2))):
        value = draw(st.one_of(st.just("A:"), any_text))
        inv.argv.append(f"--stop={value}")
        if not (value and 0 < len(value) <= 256 and is_utf8(value)):
            inv.problem("--stop")
    inv.option("--max-new-tokens", integer_text, lambda t: as_int(t, UINT32_MAX) is not None)
    for _ in range(draw(st.integers(0, 2))):
        value = draw(integer_text)
        inv.argv.append(f"--stop-token-id={value}")
        if as_int(value, UINT32_MAX) is None:
            inv.problem("--stop-token-id")
    inv.flag("--json")
    prompt_options(inv)
    return inv


def prompt_options(inv: Invocation) -> None:
    """The prompt, last: a positional after `--`, so that it may start with a dash."""
    draw = inv.draw
    kind = draw(st.sampled_from(["text", "token-ids", "messages", "none", "text and messages",
                                 "token-ids and messages"]))
    raw = inv.flag("--raw")
    if "token-ids" in kind:
        inv.argv.append("--token-ids")
    if "messages" in kind:
        messages = draw(st.lists(st.one_of(st.tuples(st.sampled_from(["user", "system", "assistant"]), any_text).map(
            ":".join), any_text), min_size=1, max_size=3))
        inv.argv += [f"--message={m}" for m in messages]
        if not all(is_message(m) for m in messages):
            inv.problem("--message")
    if kind == "none":
        inv.problem("PROMPT")
    if " and " in kind:
        inv.problem("--message", "--token-ids")
    if raw and kind != "text":
        inv.problem("--raw")
    if kind.startswith(("text", "token-ids")):
        ids = st.lists(st.integers(0, 2**33), min_size=1, max_size=4).flatmap(
            lambda xs: st.sampled_from([",", " ", ", ", "\t", ",,"]).map(lambda sep: sep.join(map(str, xs))))
        prompt = draw(st.one_of(any_text, ids) if kind.startswith("token-ids") else any_text)
        inv.argv += ["--", prompt]
        if not prompt or not is_utf8(prompt):
            inv.problem("prompt")
        elif kind.startswith("token-ids") and not is_token_ids(prompt):
            inv.problem("--token-ids")


def check(outcome: Outcome, inv: Invocation, codes=("UNAVAILABLE", "DEADLINE_EXCEEDED")) -> None:
    if inv.problems:
        names = [name for names in inv.problems for name in names]
        assert_usage_error(outcome, *([] if any(not names for names in inv.problems) else names))
    else:
        assert_unavailable(outcome, codes if f"--orchestrator={REFUSED}" in inv.argv else ("[A-Z_]+",))


@settings(FUZZ, max_examples=400)
@given(data=st.data())
def test_fuzzed_generate_invocations(data, files):
    inv = data.draw(generate_invocations(files))
    check(run_cli("generate", *inv.argv), inv)


@st.composite
def session_invocations(draw, files):
    inv = Invocation(draw)
    connection_options(inv, files)
    session_id = draw(any_text)
    inv.argv += ["--", session_id]
    if not session_id or not is_utf8(session_id):
        inv.problem("session_id")
    return inv


@settings(FUZZ, max_examples=150)
@given(data=st.data())
def test_fuzzed_session_invocations(data, files):
    inv = data.draw(session_invocations(files))
    check(run_cli("session", *inv.argv), inv)


@st.composite
def demo_invocations(draw):
    inv = Invocation(draw)
    inv.option("--prompt", any_text, lambda t: bool(t) and is_utf8(t))
    inv.option("--tau", number_text, is_fraction)
    inv.option("--max-new-tokens", integer_text, lambda t: as_int(t, UINT32_MAX) is not None)
    return inv


@settings(FUZZ, max_examples=150)
@given(inv=demo_invocations())
def test_fuzzed_demo_invocations(inv):
    """A valid one gets as far as starting the services (a stand-in here); an invalid one starts nothing."""
    with mock.patch("rstitch.local.LocalDeployment", side_effect=DeploymentReached):
        if inv.problems:
            assert_usage_error(run_cli("demo", *inv.argv))
        else:
            with pytest.raises(DeploymentReached):
                run_cli("demo", *inv.argv)


WORDS = ["generate", "session", "demo", "--policy", "--tau", "--seed", "--token-ids", "--message", "--raw", "--json",
         "--stop-token-id", "--router", "--max-new-tokens", "--draft-tokens", "--slm-probability", "--token",
         "--tls-ca", "--tls-server-name", "--prompt", "--", "-h", "random", "spec", "5,6", "user:hi"]


@settings(FUZZ, max_examples=200)
@given(argv=st.lists(st.one_of(st.sampled_from(WORDS), any_text), max_size=6))
def test_fuzzed_argument_lists(argv):
    """Any words in any order: help (exit 0), one usage line (2), one line from the connect step (1)."""
    with mock.patch("rstitch.local.LocalDeployment", side_effect=DeploymentReached):
        try:
            outcome = run_cli(*argv, env={"RSTITCH_ORCHESTRATOR": REFUSED})
        except DeploymentReached:
            return
    if outcome.code == 0:
        assert "usage:" in outcome.stdout and outcome.stderr == ""
    elif outcome.code == 1:
        assert_unavailable(outcome, ("UNAVAILABLE", "DEADLINE_EXCEEDED"))
    else:
        assert_usage_error(outcome)


# --- the Python client refuses what the CLI refuses ------------------------------------------------------


@pytest.mark.parametrize("options, option", [(dict(policy="random", tau=0.5), "tau"),
                                             (dict(policy="llm", slm_probability=0.5), "slm_probability"),
                                             (dict(policy="entropy", draft_tokens=4), "draft_tokens"),
                                             (dict(policy="spec", router=b""), "router")])
def test_make_spec_refuses_an_option_of_another_policy(options, option):
    with pytest.raises(OptionNotForPolicy, match=f"^{option} applies to policy .* only, not {options['policy']}$"):
        make_spec("hi", **options)


def test_make_spec_sends_messages_and_stop_token_ids():
    spec = make_spec(messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                     stop_token_ids=[7, 9], policy="random", seed=0)
    assert spec.WhichOneof("prompt") == "messages" and [m.role for m in spec.messages.messages] == ["system", "user"]
    assert list(spec.stop_token_ids) == [7, 9] and not spec.HasField("tau")
    for both_or_neither in (dict(), dict(prompt="hi", messages=[{"role": "user", "content": "hi"}])):
        with pytest.raises(ValueError, match="either a prompt"):
            make_spec(**both_or_neither)


# --- end to end, against a real deployment of the tiny pair ----------------------------------------------


@pytest.fixture(scope="module")
def deployment(model_paths, tmp_path_factory):
    with LocalDeployment(redis=None, slm_args=["--model", str(model_paths["slm"])],
                         llm_args=["--model", str(model_paths["llm"])],
                         log_dir=tmp_path_factory.mktemp("cli-logs")) as d:
        yield d


def generate_json(*args, env=None) -> dict:
    outcome = run_cli("generate", "--json", "--max-new-tokens", "12", *args, env=env)
    assert outcome.code == 0, outcome
    return json.loads(outcome.stdout)


def test_a_stop_token_id_ends_the_answer_with_finish_reason_stop(deployment):
    plain = generate_json("--orchestrator", deployment.address, "--policy", "llm", "What is 7*8?")
    assert plain["finish_reason"] in ("max_new_tokens", "eos")
    tokens = plain["token_ids"]
    at = next(i for i in range(1, len(tokens)) if tokens[i] not in tokens[:i])  # its first occurrence
    stopped = generate_json("--orchestrator", deployment.address, "--policy", "llm", "--stop-token-id", str(tokens[at]),
                            "What is 7*8?")
    assert stopped["token_ids"] == tokens[:at + 1] and stopped["finish_reason"] == "stop"
    outcome = run_cli("generate", "--orchestrator", deployment.address, "--stop-token-id", str(tokens[at]),
                      "--policy", "llm", "What is 7*8?")
    assert outcome.code == 0 and "finished by stop" in outcome.stderr


def test_messages_are_sent_as_a_chat(deployment):
    slm = ("--orchestrator", deployment.address, "--policy", "slm")
    as_text = generate_json(*slm, "What is 7*8?")
    as_message = generate_json(*slm, "--message", "user:What is 7*8?")
    assert as_message["prompt_token_ids"] == as_text["prompt_token_ids"]
    assert as_message["token_ids"] == as_text["token_ids"]
    chat = generate_json(*slm, "--message", "system:Be brief.", "--message", "user:What is 7*8?")
    assert len(chat["prompt_token_ids"]) > len(as_text["prompt_token_ids"])
    assert chat["prompt_token_ids"][-len(as_text["prompt_token_ids"]):] == as_text["prompt_token_ids"]


def test_the_python_client_sends_messages_and_stop_token_ids(deployment):
    with RStitchClient(deployment.address, timeout=60) as client:
        plain = client.generate(messages=[{"role": "user", "content": "Hello"}], policy="llm", max_new_tokens=12)
        stop = plain.token_ids[0]
        stopped = client.generate(messages=[{"role": "user", "content": "Hello"}], policy="llm", max_new_tokens=12,
                                  stop_token_ids=[stop])
    assert (stopped.token_ids, stopped.finish_reason) == ([stop], "stop")


def test_token_ids_separated_by_whitespace_reach_the_server(deployment):
    out = generate_json("--orchestrator", deployment.address, "--policy", "slm", "--token-ids", "5 6,\t7")
    assert out["prompt_token_ids"] == [5, 6, 7]


def test_the_address_comes_from_the_flag_then_the_environment(deployment):
    from_env = generate_json("--policy", "slm", "hi", env={"RSTITCH_ORCHESTRATOR": deployment.address})
    assert from_env["token_ids"]
    flag_wins = generate_json("--orchestrator", deployment.address, "--policy", "slm", "hi",
                              env={"RSTITCH_ORCHESTRATOR": REFUSED})
    assert flag_wins["token_ids"] == from_env["token_ids"]
    assert_unavailable(run_cli("generate", "hi", env={"RSTITCH_ORCHESTRATOR": REFUSED}))
    session = run_cli("session", from_env["session_id"], env={"RSTITCH_ORCHESTRATOR": deployment.address})
    assert session.code == 0 and from_env["session_id"] in session.stdout


@pytest.mark.parametrize("args, code", [
    (["--max-new-tokens", str(UINT32_MAX), "hi"], "RESOURCE_EXHAUSTED"),
    (["--policy", "spec", "--draft-tokens", "65", "hi"], "INVALID_ARGUMENT"),
    (["--token-ids", "99999"], "INVALID_ARGUMENT"),
    (["--stop-token-id", "99999", "hi"], "INVALID_ARGUMENT"),
])
def test_errors_from_the_server_are_one_line(deployment, args, code):
    outcome = run_cli("generate", "--orchestrator", deployment.address, *args)
    assert outcome.code == 1 and outcome.line.startswith(f"rstitch: {code}: "), outcome


def test_an_unknown_session_is_one_line(deployment):
    outcome = run_cli("session", "--orchestrator", deployment.address, "no-such-session")
    assert outcome.code == 1 and outcome.line.startswith("rstitch: NOT_FOUND: "), outcome
