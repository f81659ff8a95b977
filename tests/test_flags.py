"""Server flags: every service refuses an impossible value at start-up with one line naming the flag.

The three entry points (slm_service, llm_service, orchestrator) are parsed in this process for a table
of bad values and for a fuzzer that draws every flag's value from its whole range (negative, zero and
huge numbers, nan, inf and -0.0, odd and non-UTF-8 strings): each value is either accepted, and then
within the flag's range, or refused with exit status 2 and one stderr line naming the flag; nothing
else is raised. A few real processes show the same from the outside, and that failures after parsing
(a port that cannot be bound, engines that do not answer) end in one line too, not in a traceback;
those of an engine run its main() here, on the tiny model already loaded, rather than load it again.
"""

import contextlib
import io
import ipaddress
import math
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable
from urllib.parse import urlsplit

import pytest
import redis
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.grpc_server import start_server
from engine import cli as engine_cli
from engine.cli import make_parser as engine_parser
from engine.cli import parse_args as engine_args
from engine.servicer import SERVICE_NAME as ENGINE_SERVICE
from engine.servicer import EngineServicer
from orchestrator import __main__ as orchestrator_main
from orchestrator.__main__ import make_parser as orchestrator_parser
from orchestrator.__main__ import parse_args as orchestrator_args
from rstitch.local import free_port, wait_healthy
from rstitch.v1 import engine_pb2_grpc

ENGINES = ("slm", "llm")
# One parser per entry point, made once: making one costs more than the thousands of parses below.
PARSERS = {"slm": engine_parser("slm"), "llm": engine_parser("llm"), "orchestrator": orchestrator_parser()}
PARSE = {"slm": lambda argv: engine_args("slm", argv, PARSERS["slm"]),
         "llm": lambda argv: engine_args("llm", argv, PARSERS["llm"]),
         "orchestrator": lambda argv: orchestrator_args(argv, PARSERS["orchestrator"])}
DEFAULT_PORT = {"slm": 50051, "llm": 50052, "orchestrator": 50050}
INT32_MAX, UINT32_MAX, YEAR_S = 2**31 - 1, 2**32 - 1, 365 * 24 * 3600
PEM = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
# Values every flag is tried with, before random numbers and text.
EDGES = ["", " ", "0", "-0", "+1", "1", "-1", "0.0", "-0.0", "0.5", "1.5", "1e3", "1e309", "-1e309", "nan", "-nan",
         "inf", "-inf", "Infinity", "0x10", "1_000", " 7 ", "٣", "65535", "65536", "99999", str(INT32_MAX),
         str(INT32_MAX + 1), str(UINT32_MAX), str(UINT32_MAX + 1), str(2**64), "9" * 5000, "abc", "-", "--", "a\nb",
         "\udcff", "😀", "localhost", "127.0.0.1", "0.0.0.0", "[::1]", "::1", "999.1.1.1", "a..b", "-a", "a" * 300,
         "127.0.0.1:1", "[::1]:0", "x:65536", "redis://127.0.0.1:6379/0", "/nonexistent", "/tmp", os.devnull]
FUZZ_SETTINGS = settings(max_examples=25, derandomize=True, database=None, deadline=None, print_blob=False,
                         suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


def parse(entry: str, argv: list[str]):
    """(namespace, None) when accepted, (None, (exit status, stderr)) when refused; anything else raises."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        try:
            return PARSE[entry](argv), None
        except SystemExit as e:
            return None, (e.code, stderr.getvalue())


def assert_refused_naming(refusal, flag: str) -> None:
    code, stderr = refusal
    lines = stderr.splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].strip(), refusal
    assert flag in lines[0], refusal


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Paths the file flags are fuzzed with: a PEM file, a token, an empty file, a folder, nothing."""
    d = tmp_path_factory.mktemp("flag-files")
    (d / "cert.pem").write_bytes(PEM)
    (d / "token").write_text("s3cret\n")
    (d / "empty").write_bytes(b"")
    (d / "binary").write_bytes(b"\xff\xfe\x00")
    return {name: str(d / name) for name in ("cert.pem", "token", "empty", "binary")} | {
        "folder": str(d), "missing": str(d / "missing")}


# --- 1. a table of bad values ------------------------------------------------------------------------

ISSUE_CASES = [  # issue 13 item 4, as reported
    ("orchestrator", "--tau", "5"), ("orchestrator", "--session-ttl", "-1"),
    ("orchestrator", "--max-new-tokens", "-5"), ("orchestrator", "--max-prompt-tokens", "-1"),
    ("orchestrator", "--max-new-tokens-limit", "0"), ("orchestrator", "--port", "99999"),
    ("orchestrator", "--lease", "-1"), ("orchestrator", "--redis-retry", "nan"),
    ("orchestrator", "--engine-retry", "-1"), ("orchestrator", "--redis", "notaurl"),
    ("orchestrator", "--host", "999.1.1.1"), ("orchestrator", "--metrics-port", "99999"),
]
ENGINE_CASES = [
    ("--port", "99999"), ("--port", "-1"), ("--port", "http"), ("--host", "999.1.1.1"), ("--host", ""),
    ("--host", "a b"), ("--host", "no-such-host.invalid"), ("--host", "::1::2"), ("--host", "0x7f.1"),
    ("--kv-budget-mb", "0"), ("--kv-budget-mb", "-1"), ("--kv-budget-mb", "nan"), ("--kv-budget-mb", "inf"),
    ("--kv-budget-mb", "1e300"), ("--gpu-memory-fraction", "0"), ("--gpu-memory-fraction", "-0.0"),
    ("--gpu-memory-fraction", "1.5"), ("--gpu-memory-fraction", "nan"), ("--max-context", "0"),
    ("--max-context", str(2**32)),
    ("--max-sessions", "-1"), ("--max-sessions", "1.5"), ("--max-calls", "0"), ("--threads", "0"),
    ("--threads", "100000"), ("--workers", "-1"), ("--metrics-port", "99999"), ("--metrics-port", "-1"),
    ("--device", "gpu"), ("--device", "cuda:x"), ("--model", "/nonexistent"), ("--model-id", ""),
    ("--model-id", "\udcff"), ("--backend", "tgi"), ("--dtype", "int8"), ("--tls-cert", "/no/such.pem"),
    ("--tensor-parallel-size", "0"), ("--tensor-parallel-size", "2"),  # 2: the hf backend runs on one device
]
ORCHESTRATOR_CASES = [
    ("--tau", "-0.1"), ("--tau", "inf"), ("--tau", "nan"), ("--slm", "foo"), ("--slm", "a:0"), ("--slm", "a:1,,b:2"),
    ("--llm", ":5"), ("--llm", "a:99999"), ("--llm", "999.1.1.1:5"), ("--llm", "10.1:5"), ("--redis", "http://h:6379"),
    ("--redis", "redis://h:99999/0"), ("--redis", "redis://h/x"), ("--redis", "redis://h/0?nosuchoption=1"),
    ("--redis", "redis://h/0?socket_timeout=nan"), ("--redis", "rediss://:pw@h/0?ssl_ca_certs=/nonexistent"),
    ("--redis", "unix://"), ("--router", "/nonexistent"), ("--max-new-tokens", "0"),
    ("--max-new-tokens", str(2**32)), ("--max-sessions", "0"), ("--max-queue", "-1"), ("--engine-wait", "0"),
    ("--engine-wait", "1e9"), ("--lease", "0"), ("--lease", "inf"), ("--session-ttl", "0"),
    ("--session-ttl", "1.5"), ("--workers", "-1"), ("--engine-tls-ca", "/nonexistent"),
    ("--engine-tls-server-name", "x"), ("--auth-token-file", "/nonexistent"), ("--auth-token-file", os.devnull),
    ("--http-port", "99999"), ("--http-port", "-1"), ("--http-port", "http"),
]
CROSS_CASES = [  # rules between flags: the line names the flag that breaks it
    ("orchestrator", ["--max-new-tokens", "200", "--max-new-tokens-limit", "100"], "--max-new-tokens"),
    ("orchestrator", ["--metrics-port", "50050"], "--metrics-port"),
    ("orchestrator", ["--http-port", "50050"], "--http-port"),
    ("orchestrator", ["--http-port", "8000", "--metrics-port", "8000"], "--http-port"),
    ("slm", ["--port", "7000", "--metrics-port", "7000"], "--metrics-port"),
    ("llm", ["--tls-cert", os.devnull], "--tls-cert"),
    ("slm", ["--tls-cert", os.devnull, "--tls-key", os.devnull], "--tls-cert"),  # readable, but not PEM
    ("llm", ["--backend", "vllm", "--tensor-parallel-size", "2"], "--tensor-parallel-size"),  # not run yet
]


@pytest.mark.parametrize("entry, flag, value", ISSUE_CASES + [(e, f, v) for e in ENGINES for f, v in ENGINE_CASES]
                         + [("orchestrator", f, v) for f, v in ORCHESTRATOR_CASES])
def test_an_impossible_value_is_one_line_naming_the_flag(entry, flag, value, capsys):
    with pytest.raises(SystemExit) as e:
        PARSE[entry]([f"{flag}={value}"])
    assert_refused_naming((e.value.code, capsys.readouterr().err), flag)


@pytest.mark.parametrize("entry, argv, flag", CROSS_CASES)
def test_flags_that_contradict_each_other_are_one_line(entry, argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        PARSE[entry](argv)
    assert_refused_naming((e.value.code, capsys.readouterr().err), flag)


@pytest.mark.parametrize("variable, value, flag", [("RSTITCH_METRICS_PORT", "99999", "--metrics-port"),
                                                   ("RSTITCH_GPU_MEMORY_FRACTION", "2", "--gpu-memory-fraction")])
def test_a_bad_default_from_the_environment_is_one_line_naming_flag_and_variable(variable, value, flag, monkeypatch,
                                                                                  capsys):
    monkeypatch.setenv(variable, value)
    with pytest.raises(SystemExit) as e:
        engine_args("slm", [])  # a parser of its own: the defaults are read when it is made
    refusal = (e.value.code, capsys.readouterr().err)
    assert_refused_naming(refusal, flag)
    assert variable in refusal[1]


@pytest.mark.parametrize("backend, why", [
    ("hf", "needs --backend vllm (the hf backend runs a model on one device)"),
    ("vllm", "needs vLLM's multi-process engine, which the vllm backend does not run yet")])
def test_more_than_one_gpu_per_engine_is_refused_saying_why(backend, why, capsys):
    with pytest.raises(SystemExit) as e:
        PARSE["llm"](["--backend", backend, "--tensor-parallel-size", "2"])
    refusal = (e.value.code, capsys.readouterr().err)
    assert_refused_naming(refusal, "--tensor-parallel-size")
    assert f"--tensor-parallel-size: 2 {why}" in refusal[1]


def test_possible_values_are_taken_as_meant():
    args = orchestrator_args(["--host", "::1", "--slm", " 10.0.0.1:5,slm.svc:6 ", "--llm", "[::1]:7", "--tau", "-0.0",
                              "--lease", "0.1", "--redis", "redis://:p%40ss@127.0.0.1:6380/2", "--max-new-tokens",
                              "4096", "--engine-retry", "0", "--max-prompt-tokens", "0"])
    assert (args.host, args.slm, args.llm, args.tau, math.copysign(1, args.tau)) == (
        "[::1]", "10.0.0.1:5,slm.svc:6", "[::1]:7", 0.0, 1.0)
    engine = engine_args("slm", ["--gpu-memory-fraction", "1", "--max-context", "1", "--device", "cuda:1"])
    assert (engine.gpu_memory_fraction, engine.max_context, engine.device, engine.metrics_port) == (1.0, 1, "cuda:1", 0)
    engine = engine_args("llm", ["--backend", "vllm", "--tensor-parallel-size", "1"])
    assert (engine.backend, engine.tensor_parallel_size) == ("vllm", 1)


# --- 2. the fuzzer -----------------------------------------------------------------------------------


@dataclass
class Flag:
    name: str
    accepted: Callable  # (parsed value, namespace) -> whether the service can run with it
    values: Callable = lambda files: st.nothing()  # values of the flag's own shape, beside the edges


def whole(low, high):
    return lambda v, _: type(v) is int and low <= v <= high


def finite(low, high, low_open=False):
    return lambda v, _: math.isfinite(v) and (low < v if low_open else low <= v) and v <= high and str(v) != "-0.0"


def listenable(name: str, _) -> bool:
    try:
        ipaddress.ip_address(name.strip("[]"))
        return True
    except ValueError:
        return bool(socket.getaddrinfo(name, None))


def engine_list(value: str, _) -> bool:
    return all(host and 1 <= int(port) <= 65535 for host, _, port in (a.rpartition(":") for a in value.split(",")))


def redis_takes(url: str, _) -> bool:
    parts = urlsplit(url)
    pool = redis.ConnectionPool.from_url(url)
    return parts.scheme in ("redis", "rediss", "unix") and pool.connection_kwargs.get("db", 0) >= 0


def utf8_name(name: str, _) -> bool:
    try:
        name.encode()
    except UnicodeEncodeError:
        return False
    return bool(name.strip())


def torch_device(name: str, _) -> bool:
    return torch.device(name).type in ("cpu", "cuda", "mps", "xpu")


def pem_file(path, _) -> bool:
    with open(path, "rb") as f:
        return b"-----BEGIN " in f.read()


def never(*_) -> bool:  # a flag that is always refused when given alone (it needs a partner flag)
    return False


hosts = st.one_of(st.ip_addresses().map(str), st.from_regex(r"[a-z0-9.-]{1,20}", fullmatch=True),
                  st.sampled_from(["localhost", "[::]", "::", "0.0.0.0", "256.0.0.1", "1.2.3", "a_b"]))
ports = st.integers(-(2**33), 2**33)
addresses = st.lists(st.tuples(hosts, ports).map(lambda hp: f"{hp[0]}:{hp[1]}"), min_size=1, max_size=3).map(",".join)
redis_urls = st.builds(lambda scheme, auth, host, port, db, query: f"{scheme}://{auth}{host}{port}{db}{query}",
                       st.sampled_from(["redis", "rediss", "unix", "http", "REDIS", ""]),
                       st.sampled_from(["", ":pw@", "user:pw@", ":@"]), hosts,
                       st.one_of(st.just(""), ports.map(lambda p: f":{p}")),
                       st.sampled_from(["", "/", "/0", "/15", "/-1", "/x", "/0/1"]),
                       st.sampled_from(["", "?socket_timeout=1", "?socket_timeout=-1", "?socket_timeout=nan",
                                        "?db=3", "?db=-3", "?nope=1", "?ssl_ca_certs=/nonexistent", "?protocol=9"]))


def file_values(files):
    return st.sampled_from(sorted(files.values()))


ENGINE_FLAGS = [
    Flag("--model", lambda v, _: os.path.exists(v), file_values),
    Flag("--model-id", utf8_name),
    Flag("--host", listenable, lambda _: hosts),
    Flag("--port", whole(0, 65535), lambda _: ports.map(str)),
    Flag("--backend", lambda v, _: v in ("hf", "vllm"), lambda _: st.sampled_from(["hf", "vllm", "HF"])),
    Flag("--device", torch_device, lambda _: st.sampled_from(["cpu", "cuda", "cuda:0", "cuda:-1", "mps", "xpu:3",
                                                              "cpu:0", "meta", "CUDA"])),
    Flag("--dtype", lambda v, _: v in ("float32", "bfloat16", "float16"),
         lambda _: st.sampled_from(["float32", "bfloat16", "float64"])),
    Flag("--kv-budget-mb", finite(0, 2**30, low_open=True)),
    Flag("--gpu-memory-fraction", finite(0, 1, low_open=True)),
    # Alone (the hf backend) only 1; more is refused with --backend vllm too until it runs vLLM's multi-process engine.
    Flag("--tensor-parallel-size", whole(1, 1), lambda _: st.sampled_from(["1", "2", "8", "1024", "1025"])),
    Flag("--max-context", whole(1, UINT32_MAX)),
    Flag("--max-sessions", whole(0, INT32_MAX)),
    Flag("--max-calls", whole(1, INT32_MAX)),
    Flag("--threads", whole(1, 1024)),
    Flag("--workers", whole(0, INT32_MAX)),
    Flag("--metrics-port", lambda v, a: v == 0 or (whole(1, 65535)(v, a) and v != a.port), lambda _: ports.map(str)),
    Flag("--tls-cert", never, file_values), Flag("--tls-key", never, file_values),
    Flag("--tls-client-ca", never, file_values),
]
ORCHESTRATOR_FLAGS = [flag for flag in ENGINE_FLAGS if flag.name in {
    "--host", "--port", "--metrics-port", "--tls-cert", "--tls-key", "--tls-client-ca", "--workers"}] + [
    Flag("--slm", engine_list, lambda _: addresses), Flag("--llm", engine_list, lambda _: addresses),
    Flag("--redis", redis_takes, lambda _: redis_urls),
    Flag("--tau", finite(0, 1)),
    Flag("--router", lambda v, _: os.access(v, os.R_OK) and not os.path.isdir(v), file_values),
    Flag("--max-new-tokens", whole(1, 4096)),  # the default limit
    Flag("--max-new-tokens-limit", whole(128, UINT32_MAX)),  # the default length
    Flag("--max-prompt-tokens", whole(0, UINT32_MAX)),
    Flag("--max-sessions", whole(1, INT32_MAX)),
    Flag("--max-queue", whole(0, INT32_MAX)),
    Flag("--engine-retry", finite(0, YEAR_S)), Flag("--redis-retry", finite(0, YEAR_S)),
    Flag("--lease", finite(0.1, YEAR_S)), Flag("--session-ttl", whole(1, YEAR_S)),
    Flag("--engine-wait", finite(0, YEAR_S, low_open=True)),
    Flag("--engine-tls-ca", pem_file, file_values),
    Flag("--engine-tls-cert", never, file_values), Flag("--engine-tls-key", never, file_values),
    Flag("--engine-tls-server-name", never, lambda _: st.sampled_from(["localhost", "x y"])),
    Flag("--auth-token-file", lambda v, _: v.endswith("token"), file_values),
    Flag("--http-port", lambda v, a: v == 0 or (whole(1, 65535)(v, a) and v not in (a.port, a.metrics_port)),
         lambda _: ports.map(str)),
]
FUZZED = [("engine", f) for f in ENGINE_FLAGS] + [("orchestrator", f) for f in ORCHESTRATOR_FLAGS]


def check(entry: str, flag: Flag, value: str) -> None:
    """The value is accepted and within the flag's range, or refused in one line naming the flag."""
    args, refusal = parse(entry, [f"{flag.name}={value}"])
    if refusal is not None:
        assert_refused_naming(refusal, flag.name)
    else:
        parsed = getattr(args, flag.name.lstrip("-").replace("-", "_"))
        assert flag.accepted(parsed, args), (flag.name, value, parsed)


@pytest.mark.parametrize("kind, flag", FUZZED, ids=[f"{kind}{flag.name}" for kind, flag in FUZZED])
def test_every_edge_value_of_every_flag_is_accepted_in_range_or_refused_in_one_line(kind, flag, files):
    for i, value in enumerate(EDGES + sorted(files.values())):
        check(ENGINES[i % 2] if kind == "engine" else kind, flag, value)


@pytest.mark.parametrize("kind, flag", FUZZED, ids=[f"{kind}{flag.name}" for kind, flag in FUZZED])
@FUZZ_SETTINGS
@given(data=st.data())
def test_random_values_of_every_flag_are_accepted_in_range_or_refused_in_one_line(kind, flag, data, files):
    entry = data.draw(st.sampled_from(ENGINES), "entry") if kind == "engine" else kind
    value = data.draw(st.one_of(flag.values(files), st.integers(-(2**70), 2**70).map(str), st.floats().map(repr),
                                st.text(max_size=30)), "value")
    check(entry, flag, value)


@FUZZ_SETTINGS
@given(length=st.integers(-10, 2**33), limit=st.integers(-10, 2**33))
def test_the_answer_length_is_within_its_limit_or_refused_in_one_line(length, limit):
    args, refusal = parse("orchestrator", [f"--max-new-tokens={length}", f"--max-new-tokens-limit={limit}"])
    if refusal is not None:
        assert_refused_naming(refusal, "--max-new-tokens")
    else:
        assert 1 <= args.max_new_tokens <= args.max_new_tokens_limit <= UINT32_MAX


# --- 3. real processes ----------------------------------------------------------------------------


def python_m(*args):
    return subprocess.Popen([sys.executable, "-m", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))


def assert_failed_in_one_line(process: subprocess.Popen, *names: str) -> None:
    _, stderr = process.communicate(timeout=120)
    assert process.returncode != 0 and "Traceback" not in stderr, stderr
    last = stderr.strip().splitlines()[-1]
    assert all(name in last for name in names), stderr


BAD_STARTS = [
    (["orchestrator", "--redis", "notaurl"], ["--redis"]),
    (["orchestrator", "--host", "999.1.1.1"], ["--host"]),
    (["orchestrator", "--port", "99999"], ["--port"]),
    (["slm_service", "--model", "/nonexistent"], ["--model", "/nonexistent"]),
    (["slm_service", "--metrics-port", "99999"], ["--metrics-port"]),
    (["llm_service", "--kv-budget-mb", "nan"], ["--kv-budget-mb"]),
    (["llm_service", "--backend", "vllm", "--tensor-parallel-size", "2"], ["--tensor-parallel-size", "multi-process"]),
    (["orchestrator", "--slm", "127.0.0.1:1", "--llm", "127.0.0.1:1", "--engine-wait", "0.5"],
     ["orchestrator:", "127.0.0.1:1"]),  # engines unreachable: after parsing
]


def test_processes_refuse_impossible_flags_in_one_line_and_serve_with_possible_ones(model_paths):
    port = free_port()
    engine = python_m("slm_service", "--model", str(model_paths["slm"]), "--port", str(port), "--host", "localhost",
                      "--kv-budget-mb", "1", "--threads", "1", "--max-context", "256", "--device", "cpu")
    refused = [(python_m(*argv), names) for argv, names in BAD_STARTS]  # all at once: each is mostly start-up
    try:
        for process, names in refused:
            assert_failed_in_one_line(process, *names)
        wait_healthy(f"127.0.0.1:{port}", engine, timeout=120)
    finally:
        engine.kill()
        engine.communicate()


@pytest.fixture
def engine_main(engines, monkeypatch):
    """engine.cli.main on the in-process tiny SLM (no model load), failing the test if it ever serves."""
    monkeypatch.setattr(engine_cli, "build_engine", lambda role, args: engines[role])
    monkeypatch.setattr(engine_cli, "serve_until_signalled", lambda server: pytest.fail("it started serving"))
    return engine_cli.main


def test_an_engine_whose_metrics_port_is_taken_stops_in_one_line(engine_main):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(SystemExit) as e:
            engine_main("slm", ["--port", "0", "--metrics-port", str(taken.getsockname()[1])])
    message = str(e.value.code)
    assert message.startswith("slm_service: cannot serve metrics") and "--metrics-port" in message, message
    assert "\n" not in message


# 192.0.2.1 (TEST-NET-1) is an address, but no interface here has it: the bind fails, after parsing.
def test_an_engine_that_cannot_bind_its_address_stops_in_one_line(engine_main):
    with pytest.raises(SystemExit) as e:
        engine_main("slm", ["--host", "192.0.2.1", "--port", "0"])
    message = str(e.value.code)
    assert message.startswith("slm_service: ") and "--host 192.0.2.1" in message and "\n" not in message


@pytest.fixture
def orchestrator_main_on_engines(engines, monkeypatch):
    """orchestrator's main() with the given args after --slm and --llm of the in-process tiny pair served over
    gRPC, failing the test if it ever serves."""
    servers = [start_server(lambda s, e=engines[role]: engine_pb2_grpc.add_EngineServicer_to_server(
        EngineServicer(e), s), [ENGINE_SERVICE], "127.0.0.1", 0) for role in ENGINES]
    monkeypatch.setattr(orchestrator_main, "serve_until_signalled", lambda server: pytest.fail("it started serving"))
    yield lambda *args: orchestrator_main.main(["--slm", f"127.0.0.1:{servers[0][1]}",
                                                "--llm", f"127.0.0.1:{servers[1][1]}", *args])
    for server, _ in servers:
        server.stop(None)


def test_an_orchestrator_that_cannot_bind_its_address_stops_in_one_line(orchestrator_main_on_engines):
    with pytest.raises(SystemExit) as e:
        orchestrator_main_on_engines("--host", "192.0.2.1", "--port", "0", "--engine-wait", "30")
    message = str(e.value.code)
    assert message.startswith("orchestrator: ") and "--host 192.0.2.1" in message and "\n" not in message


def test_an_orchestrator_whose_http_port_is_taken_stops_in_one_line(orchestrator_main_on_engines):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(SystemExit) as e:
            orchestrator_main_on_engines("--port", "0", "--http-port", str(taken.getsockname()[1]))
    message = str(e.value.code)
    assert message.startswith("orchestrator: cannot serve HTTP") and "--http-port" in message, message
    assert "\n" not in message


# --- 4. --help ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", PARSE)
def test_help_shows_every_default(entry, capsys):
    with pytest.raises(SystemExit) as e:
        PARSE[entry](["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    defaults = [action for action in PARSERS[entry]._actions if action.default not in (None, "==SUPPRESS==")]
    assert len(defaults) >= 8
    for action in defaults:
        assert f"(default: {action.default})" in text or "default" in action.help, action.option_strings
    assert f"(default: {DEFAULT_PORT[entry]})" in text
