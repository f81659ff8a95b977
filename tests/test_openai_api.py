"""The OpenAI-compatible HTTP API (--http-port), driven by the real `openai` package (and by httpx for
bodies no client would send) against real deployments of the tiny pair on loopback.

One deployment with a bearer token, Redis and metrics: answers over HTTP equal the gRPC API's (and the
`rstitch` CLI's), streamed and plain alike; usage, sources, sampling with a seed, logprobs, stop
strings; a table of bad requests, each with its status and an OpenAI-shaped body; a client that
disconnects mid-stream ends its session cancelled. A second one over mutual TLS, with room for one
session and short retries, on a Redis of its own: 429 at the admission limit (for HTTP and gRPC
alike), 503 once an engine, then Redis, is gone; the process keeps serving through all of it.
"""

import http.client as http_client
import json
import ssl
import time
from dataclasses import dataclass

import grpc
import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from common.grpc_server import MAX_MESSAGE_BYTES
from rstitch import RStitchClient
from rstitch.local import LocalDeployment, Redis, free_port
from rstitch.security import ClientTLS
from rstitch.v1 import orchestrator_pb2 as opb

from .test_cli import run_cli
from .test_security import make_cert

TOKEN = "s3cret-http-token"
PROMPT = "What is 7*8?"
LONG = "Count to a thousand"  # the tiny SLM answers it in ~470 tokens: a stream that holds its slot a while
MANY_SPANS = "x"  # R-Stitch on the tiny pair answers it in ~220 tokens over dozens of spans


@dataclass
class Served:
    deployment: LocalDeployment
    base_url: str  # http(s)://127.0.0.1:PORT
    model: str
    metrics_url: str = ""

    def openai(self, api_key: str = TOKEN, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key=api_key, max_retries=0, timeout=60, **kwargs)


@pytest.fixture(scope="module")
def served(model_paths, tmp_path_factory):
    logs = tmp_path_factory.mktemp("openai-logs")
    (logs / "token").write_text(TOKEN + "\n")
    http, metrics = free_port(), free_port()
    with LocalDeployment(slm_args=["--model", str(model_paths["slm"])], llm_args=["--model", str(model_paths["llm"])],
                         orchestrator_args=["--http-port", str(http), "--metrics-port", str(metrics),
                                            "--auth-token-file", str(logs / "token")], log_dir=logs) as d:
        yield Served(d, f"http://127.0.0.1:{http}", str(model_paths["llm"]), f"http://127.0.0.1:{metrics}/metrics")


@pytest.fixture(scope="module")
def client(served):
    return served.openai()


@pytest.fixture(scope="module")
def grpc_client(served):
    with RStitchClient(served.deployment.address, timeout=60, token=TOKEN) as c:
        yield c


def chat(client, model, prompt=PROMPT, **kwargs):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}], **kwargs)


def streamed_chat(client, model, prompt=PROMPT, **kwargs) -> list:
    return list(chat(client, model, prompt, stream=True, stream_options={"include_usage": True}, **kwargs))


def generate_json(served: Served, *args) -> dict:
    outcome = run_cli("generate", "--json", "--orchestrator", served.deployment.address, *args,
                      env={"RSTITCH_TOKEN": TOKEN})
    assert outcome.code == 0, outcome
    return json.loads(outcome.stdout)


def token_chunks(chunks) -> list:
    return [c for c in chunks if c.choices and c.rstitch["sources"]]


# --- answers ---------------------------------------------------------------------------------------------


def test_the_models_list_names_the_pair_by_its_llm(client, model_paths):
    models = client.models.list().data
    assert [m.id for m in models] == [str(model_paths["llm"])]
    assert models[0].rstitch == {"slm": str(model_paths["slm"]), "llm": str(model_paths["llm"])}


def test_chat_plain_streamed_and_rstitch_generate_agree_at_temperature_0(client, served):
    plain = chat(client, served.model, max_tokens=24, temperature=0)
    chunks = streamed_chat(client, served.model, max_tokens=24, temperature=0)
    cli = generate_json(served, "--max-new-tokens", "24", "--temperature", "0", PROMPT)
    streamed_text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert plain.choices[0].message.content == streamed_text == cli["text"] != ""
    assert plain.rstitch["sources"] == [s for c in chunks for s in c.rstitch["sources"]] == cli["sources"]
    assert plain.rstitch["entropies"] == pytest.approx(cli["entropies"], abs=1e-6)
    # One chunk per token, after the one that opens the stream with the assistant's role.
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [len(c.rstitch["sources"]) for c in token_chunks(chunks)] == [1] * plain.usage.completion_tokens
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].choices[0].finish_reason == plain.choices[0].finish_reason == "length"
    stats = (finish[0].rstitch["stats"], plain.rstitch["stats"], cli["stats"])
    assert len({(s["slm_tokens"], s["llm_tokens"], s["switches"]) for s in stats}) == 1
    assert chunks[-1].choices == [] and chunks[-1].usage == plain.usage
    assert {c.rstitch["session_id"] for c in chunks} == {chunks[0].id.removeprefix("chatcmpl-")}


def test_completions_are_raw_text_plain_or_streamed_and_take_token_ids(client, served):
    plain = client.completions.create(model=served.model, prompt=PROMPT, max_tokens=16, temperature=0)
    chunks = list(client.completions.create(model=served.model, prompt=PROMPT, max_tokens=16, temperature=0,
                                            stream=True))
    cli = generate_json(served, "--raw", "--max-new-tokens", "16", "--temperature", "0", PROMPT)
    assert plain.choices[0].text == "".join(c.choices[0].text for c in chunks) == cli["text"]
    assert plain.usage.prompt_tokens == len(cli["prompt_token_ids"])
    by_ids = client.completions.create(model=served.model, prompt=cli["prompt_token_ids"], max_tokens=16,
                                       temperature=0)
    assert by_ids.choices[0].text == cli["text"] and by_ids.rstitch["sources"] == cli["sources"]


@pytest.mark.parametrize("policy", ["llm", "slm"])
def test_a_single_model_policy_writes_every_token_with_that_model(client, served, policy):
    plain = chat(client, served.model, max_tokens=16, extra_body={"policy": policy})
    assert plain.rstitch["sources"] == [policy] * plain.usage.completion_tokens
    chunks = streamed_chat(client, served.model, max_tokens=16, extra_body={"policy": policy})
    assert {s for c in chunks for s in c.rstitch["sources"]} == {policy}


def test_usage_counts_the_sessions_tokens(client, served, grpc_client):
    plain = chat(client, served.model, max_tokens=20, extra_body={"tau": 0.1})
    session = grpc_client.session(plain.rstitch["session_id"])
    logged = sum(len(span.token_ids) for span in session.spans)
    assert plain.usage.prompt_tokens == len(session.prompt_token_ids)
    assert plain.usage.completion_tokens == logged == session.stats.slm_tokens + session.stats.llm_tokens > 0
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + plain.usage.completion_tokens
    assert session.tau == pytest.approx(0.1)


def test_a_seeded_sampled_request_is_reproducible(client, served):
    sampled = {"max_tokens": 24, "temperature": 1.0, "top_p": 0.95, "extra_body": {"top_k": 50}}
    first = chat(client, served.model, seed=1234, **sampled).choices[0].message.content
    again = chat(client, served.model, seed=1234, **sampled).choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in streamed_chat(client, served.model, seed=1234,
                                                                                **sampled) if c.choices)
    assert first == again == streamed
    others = {chat(client, served.model, seed=seed, **sampled).choices[0].message.content for seed in (1, 2, 3)}
    assert others - {first}, "other seeds never changed the answer: the seed is not what decides it"


def test_logprobs_are_each_tokens_and_its_alternatives(client, served):
    plain = chat(client, served.model, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3)
    entries = plain.choices[0].logprobs.content
    assert "".join(e.token for e in entries) == plain.choices[0].message.content
    for entry in entries:  # greedy: the token written is its model's most likely one
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        assert entry.logprob == pytest.approx(max(alt.logprob for alt in entry.top_logprobs))
    text = client.completions.create(model=served.model, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=2)
    assert len(text.choices[0].logprobs.tokens) == len(text.choices[0].logprobs.top_logprobs) == 8


def test_a_stop_string_ends_the_answer_before_it(client, served):
    text = chat(client, served.model, max_tokens=24, temperature=0).choices[0].message.content
    stop = text[len(text) // 2]
    expected = text[:text.index(stop)]
    plain = chat(client, served.model, max_tokens=24, temperature=0, stop=[stop])
    chunks = streamed_chat(client, served.model, max_tokens=24, temperature=0, stop=stop)
    assert plain.choices[0].message.content == expected == "".join(c.choices[0].delta.content or "" for c in chunks
                                                                   if c.choices)
    assert plain.choices[0].finish_reason == "stop" and plain.rstitch["finish_reason"] == "stop"


# --- errors ----------------------------------------------------------------------------------------------

DROP = object()
TEXT_BODY = {"prompt": PROMPT, "max_tokens": 4}
CHAT_BODY = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 4}
# name: (path, body changes (DROP removes a field) or raw bytes, status, the param the error names)
BAD_REQUESTS = {
    "temperature negative": ("chat", {"temperature": -1}, 400, "temperature"),
    "temperature as a string": ("chat", {"temperature": "0.5"}, 400, "temperature"),
    "top_p 0": ("chat", {"top_p": 0}, 400, "top_p"),
    "n 2": ("chat", {"n": 2}, 400, "n"),
    "presence_penalty": ("chat", {"presence_penalty": 0.5}, 400, "presence_penalty"),
    "tools (vLLM takes them)": ("chat", {"tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    "response_format": ("chat", {"response_format": {"type": "json_object"}}, 400, "response_format"),
    "min_tokens (a vLLM extra)": ("chat", {"min_tokens": 4}, 400, "min_tokens"),
    "a field nobody knows": ("chat", {"frobnicate": 1}, 400, "frobnicate"),
    "no messages": ("chat", {"messages": DROP}, 400, "messages"),
    "empty messages": ("chat", {"messages": []}, 400, "messages"),
    "a message without content": ("chat", {"messages": [{"role": "user"}]}, 400, "messages[0].content"),
    "an image part": ("chat", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
                      400, "messages[0].content"),
    "max_tokens 0": ("chat", {"max_tokens": 0}, 400, "max_tokens"),
    "max_tokens over the limit": ("chat", {"max_tokens": 10**6}, 400, "max_tokens"),
    "max_completion_tokens over the limit": ("chat", {"max_completion_tokens": 10**6, "max_tokens": DROP}, 400,
                                             "max_completion_tokens"),
    "max_tokens and max_completion_tokens differ": ("chat", {"max_completion_tokens": 5}, 400, "max_tokens"),
    "17 stop strings": ("chat", {"stop": [str(i) for i in range(17)]}, 400, "stop"),
    "an empty stop string": ("chat", {"stop": [""]}, 400, "stop[0]"),
    "top_logprobs without logprobs": ("chat", {"top_logprobs": 2}, 400, "top_logprobs"),
    "top_logprobs 21": ("chat", {"logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    "seed negative": ("chat", {"seed": -1}, 400, "seed"),
    "stream_options without stream": ("chat", {"stream_options": {"include_usage": True}}, 400, "stream_options"),
    "unknown policy": ("chat", {"policy": "fastest"}, 400, "policy"),
    "tau 2": ("chat", {"tau": 2}, 400, "tau"),
    "tau with policy llm": ("chat", {"policy": "llm", "tau": 0.5}, 400, "tau"),
    "draft_tokens 65": ("chat", {"policy": "spec", "draft_tokens": 65}, 400, "draft_tokens"),
    "stop_token_ids outside the vocabulary": ("chat", {"stop_token_ids": [99999]}, 400, None),  # the core's check
    "prompt token ids outside the vocabulary": ("text", {"prompt": [99999]}, 400, None),
    "a batch of prompts": ("text", {"prompt": ["a", "b"]}, 400, "prompt"),
    "echo": ("text", {"echo": True}, 400, "echo"),
    "best_of 2": ("text", {"best_of": 2}, 400, "best_of"),
    "logprobs 21": ("text", {"logprobs": 21}, 400, "logprobs"),
    "body not JSON": ("chat", b"{nope", 400, None),
    "body a list": ("chat", b"[1]", 400, None),
    "NaN temperature": ("chat", b'{"model": "MODEL", "messages": [{"role": "user", "content": "x"}], '
                                b'"temperature": NaN}', 400, "temperature"),
    "unknown model": ("chat", {"model": "gpt-4o"}, 404, "model"),
}
PATHS = {"chat": "/v1/chat/completions", "text": "/v1/completions"}


def request_body(kind: str, changes, model: str) -> bytes:
    if isinstance(changes, bytes):
        return changes.replace(b"MODEL", model.encode())
    body = {"model": model, **(CHAT_BODY if kind == "chat" else TEXT_BODY), **changes}
    return json.dumps({k: v for k, v in body.items() if v is not DROP}).encode()


def assert_openai_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str)
    assert error["param"] == param, error
    return error


@pytest.fixture(scope="module")
def http(served):
    with httpx.Client(base_url=served.base_url, timeout=60) as h:
        yield h


@pytest.mark.parametrize("name", BAD_REQUESTS)
def test_a_bad_request_gets_its_status_and_an_openai_error_naming_the_field(http, served, name):
    kind, changes, status, param = BAD_REQUESTS[name]
    response = http.post(PATHS[kind], content=request_body(kind, changes, served.model),
                         headers={"authorization": f"Bearer {TOKEN}", "content-type": "application/json"})
    assert_openai_error(response, status, param)


@pytest.mark.parametrize("method, path, token, status", [
    ("POST", "/v1/chat/completions", None, 401), ("POST", "/v1/chat/completions", "wrong", 401),
    ("POST", "/v1/completions", f"{TOKEN}x", 401), ("GET", "/v1/models", None, 401),
    ("GET", "/v1/embeddings", TOKEN, 404), ("GET", "/v1/chat/completions", TOKEN, 405),
])
def test_tokens_paths_and_methods_are_refused_as_openai_errors(http, served, method, path, token, status):
    headers = {"authorization": f"Bearer {token}"} if token else {}
    response = http.request(method, path, content=request_body("chat", {}, served.model), headers=headers)
    assert_openai_error(response, status)


def test_the_token_is_checked_before_the_body_is_read(http):
    assert_openai_error(http.post("/v1/chat/completions", content=b"{nope"), 401)


def test_a_body_over_the_limit_is_refused_before_it_is_read(served):
    def declared(length: int):
        connection = http_client.HTTPConnection(served.base_url.removeprefix("http://"), timeout=30)
        connection.putrequest("POST", "/v1/chat/completions")
        for name, value in (("Authorization", f"Bearer {TOKEN}"), ("Content-Type", "application/json"),
                            ("Content-Length", str(length))):
            connection.putheader(name, value)
        connection.endheaders()  # and no body: the answer must not wait for it
        response = connection.getresponse()
        return response.status, json.loads(response.read())

    status, body = declared(MAX_MESSAGE_BYTES + 1)
    assert status == 413 and str(MAX_MESSAGE_BYTES) in body["error"]["message"]

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(MAX_MESSAGE_BYTES // 2**20 + 1):
            yield b" " * 2**20

    response = httpx.post(f"{served.base_url}/v1/chat/completions", content=chunks(), timeout=60,
                          headers={"authorization": f"Bearer {TOKEN}", "content-type": "application/json"})
    assert_openai_error(response, 413)


def test_the_openai_client_raises_its_own_error_classes(served):
    with pytest.raises(openai.AuthenticationError):
        served.openai(api_key="wrong").models.list()
    with pytest.raises(openai.NotFoundError) as e:
        chat(served.openai(), "gpt-4o")
    assert e.value.code == "model_not_found" and e.value.param == "model"
    with pytest.raises(openai.BadRequestError) as e:
        chat(served.openai(), served.model, temperature=-1)
    assert e.value.param == "temperature"


def test_no_bad_request_stopped_the_server(http, client, served):
    assert served.deployment.orchestrator.process.poll() is None
    assert http.get("/health").json() == {"status": "ok"}
    assert chat(client, served.model, max_tokens=4).usage.completion_tokens == 4


# --- a client that goes away -------------------------------------------------------------------------------


def test_a_client_that_disconnects_mid_stream_cancels_its_session(client, served, grpc_client):
    whole = chat(client, served.model, MANY_SPANS, max_tokens=400)
    assert whole.usage.completion_tokens > 150 and whole.rstitch["stats"]["spans"] > 20
    stream = chat(client, served.model, MANY_SPANS, max_tokens=400, stream=True)
    received = []
    for chunk in stream:
        received += chunk.rstitch["sources"]
        if len(received) >= 3:
            break
    stream.close()
    session_id = chunk.rstitch["session_id"]
    deadline = time.monotonic() + 20
    while (session := grpc_client.session(session_id)).status == opb.STATUS_RUNNING:
        assert time.monotonic() < deadline, "the session kept running after its client left"
        time.sleep(0.05)
    # Spans are logged as they end: the log holds what was decoded before the engines stopped.
    assert (session.status, session.finish_reason) == (opb.STATUS_CANCELLED, opb.FINISH_REASON_CANCELLED)
    logged = sum(len(span.token_ids) for span in session.spans)
    assert logged < whole.usage.completion_tokens / 2, (logged, whole.usage.completion_tokens)


# --- metrics -----------------------------------------------------------------------------------------------


def test_latency_histograms_count_http_and_grpc_requests_alike(client, served, grpc_client):
    chat(client, served.model, max_tokens=4)
    grpc_client.generate(PROMPT, max_new_tokens=4)
    samples = {(s.name, s.labels.get("api")): s.value for family in
               text_string_to_metric_families(httpx.get(served.metrics_url).text) for s in family.samples}
    for api in ("http", "grpc"):
        assert samples[("rstitch_time_to_first_token_seconds_count", api)] >= 1
        assert samples[("rstitch_inter_token_latency_seconds_count", api)] >= 3
        assert samples[("rstitch_e2e_request_latency_seconds_count", api)] >= 1


# --- over TLS, at the limits, without Redis or an engine ---------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("http-pki")
    ca = make_cert(d, "ca", ca=True)
    make_cert(d, "server", ca)
    make_cert(d, "client", ca)
    return {name: str(d / name) for name in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}


@dataclass
class Fragile(Served):
    redis: Redis | None = None
    tls: ClientTLS | None = None


@pytest.fixture(scope="module")
def fragile(model_paths, pki, tmp_path_factory):
    """Mutual TLS on both ports, one session at a time and none queued, half a second of retries, its own
    Redis. The tests below stop its SLM engine, then its Redis: they come last, in that order."""
    serving = ["--tls-cert", pki["server.pem"], "--tls-key", pki["server.key"]]
    http = free_port()
    redis = Redis()
    try:
        with LocalDeployment(redis=redis.url, log_dir=tmp_path_factory.mktemp("fragile-logs"),
                             tls=ClientTLS(pki["ca.pem"], pki["client.pem"], pki["client.key"]),
                             slm_args=["--model", str(model_paths["slm"]), *serving],
                             llm_args=["--model", str(model_paths["llm"]), *serving],
                             orchestrator_args=[*serving, "--tls-client-ca", pki["ca.pem"],
                                                "--engine-tls-ca", pki["ca.pem"], "--http-port", str(http),
                                                "--max-sessions", "1", "--max-queue", "0", "--engine-retry", "0.5",
                                                "--redis-retry", "0.5"]) as d:
            yield Fragile(d, f"https://127.0.0.1:{http}", str(model_paths["llm"]), redis=redis, tls=d.tls)
    finally:
        redis.stop()


def https_context(pki, certificate: bool = True) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=pki["ca.pem"])
    if certificate:
        context.load_cert_chain(pki["client.pem"], pki["client.key"])
    return context


def https_client(served: Served, pki, certificate: bool = True) -> openai.OpenAI:
    return served.openai(http_client=httpx.Client(verify=https_context(pki, certificate)))


def assert_still_serving(fragile: Fragile, pki):
    assert fragile.deployment.orchestrator.process.poll() is None
    assert httpx.get(f"{fragile.base_url}/health", verify=https_context(pki)).json() == {"status": "ok"}


def test_https_serves_clients_with_a_certificate_and_refuses_others(fragile, pki):
    answer = chat(https_client(fragile, pki), fragile.model, max_tokens=6)
    assert answer.usage.completion_tokens == 6
    with pytest.raises(openai.APIConnectionError):
        chat(https_client(fragile, pki, certificate=False), fragile.model, max_tokens=6)
    with pytest.raises(openai.APIConnectionError):
        chat(Served(fragile.deployment, fragile.base_url.replace("https", "http"), fragile.model).openai(),
             fragile.model, max_tokens=6)


def test_the_admission_limit_is_429_for_http_and_grpc_alike(fragile, pki):
    client = https_client(fragile, pki)
    holding = chat(client, fragile.model, LONG, stream=True, max_tokens=480, extra_body={"policy": "slm"})
    try:
        next(iter(holding))  # the one session slot is taken while this stream runs
        with pytest.raises(openai.RateLimitError) as e:
            chat(client, fragile.model, max_tokens=4)
        assert e.value.status_code == 429 and "--max-sessions" in e.value.message
        with RStitchClient(fragile.deployment.address, tls=fragile.tls, timeout=30) as grpc_client:
            with pytest.raises(grpc.RpcError) as refused:
                list(grpc_client.stream(PROMPT, max_new_tokens=4))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        holding.close()
    assert_still_serving(fragile, pki)


def test_an_unreachable_engine_is_503_streamed_or_not(fragile, pki):
    fragile.deployment.slm.stop()
    client = https_client(fragile, pki)
    for stream in (False, True):
        with pytest.raises(openai.InternalServerError) as e:
            chat(client, fragile.model, max_tokens=4, stream=stream)
        assert e.value.status_code == 503 and "engine" in e.value.message
    assert_still_serving(fragile, pki)


def test_an_unreachable_redis_is_503(fragile, pki):
    fragile.redis.stop()
    with pytest.raises(openai.InternalServerError) as e:
        chat(https_client(fragile, pki), fragile.model, max_tokens=4)
    assert e.value.status_code == 503 and "Redis" in e.value.message
    assert_still_serving(fragile, pki)
