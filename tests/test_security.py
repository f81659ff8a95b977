"""TLS, mutual TLS, the bearer token and Redis passwords/TLS, on real processes with certificates made here.

One secure deployment serves most tests: engines that demand client certificates (mutual TLS), an
orchestrator with mutual TLS and a token, and a Redis that wants a password (over TLS when the
installed redis-server can).
"""

import datetime
import ipaddress
import json
import os
import secrets
import socket
import subprocess
import sys
from urllib.parse import quote

import grpc
import pytest
import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.grpc_server import start_server
from orchestrator.auth import BearerTokenInterceptor
from orchestrator.engine_client import LocalEngineClient
from orchestrator.service import Orchestrator
from orchestrator.store import MemorySessionStore
from rstitch import RStitchClient
from rstitch.local import LocalDeployment, Redis
from rstitch.security import ClientTLS, channel
from rstitch.v1 import orchestrator_pb2 as opb
from rstitch.v1 import orchestrator_pb2_grpc

from .conftest import PROMPTS

TOKEN = secrets.token_urlsafe(24)
PASSWORD = "s3cret/with:odd@chars"  # must survive being put in a URL


def make_cert(directory, name, issuer=None, ca=False):
    """name.pem and name.key in directory, signed by issuer (cert, key) or self-signed; SANs 127.0.0.1, localhost.
    With the key identifiers and usages that strict verifiers (Python 3.13's ssl, say) insist on."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_cert, issuer_key = issuer or (None, key)
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(subject)
               .issuer_name(issuer_cert.subject if issuer_cert else subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))
    if ca:
        # digital_signature, key_cert_sign and crl_sign
        builder = builder.add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False),
                                        critical=True)
    else:
        builder = (builder
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                                  critical=False)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                         ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                   .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                               x509.DNSName("localhost")]), critical=False))
    cert = builder.sign(issuer_key, hashes.SHA256())
    (directory / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / f"{name}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                              serialization.PrivateFormat.PKCS8,
                                                              serialization.NoEncryption()))
    return cert, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """ca signs server and client; other-ca, which nobody trusts, signs other-client."""
    d = tmp_path_factory.mktemp("pki")
    ca = make_cert(d, "ca", ca=True)
    make_cert(d, "server", ca)
    make_cert(d, "client", ca)
    make_cert(d, "other-client", make_cert(d, "other-ca", ca=True))
    (d / "token").write_text(TOKEN + "\n")
    return {p.name: str(p) for p in d.iterdir()}


def redis_has_tls() -> bool:
    """A redis-server built with TLS complains about the missing certificate rather than the option."""
    probe = subprocess.run(["redis-server", "--port", "0", "--tls-port", "1"], capture_output=True, text=True,
                           timeout=10)
    return "Failed to configure TLS" in probe.stdout + probe.stderr


@pytest.fixture(scope="module")
def secure_redis(pki):
    tls = (pki["server.pem"], pki["server.key"], pki["ca.pem"]) if redis_has_tls() else None
    server = Redis(password=PASSWORD, tls=tls)
    yield server
    server.stop()


def serving(pki):
    """The flags of a service that serves mutual TLS."""
    return ["--tls-cert", pki["server.pem"], "--tls-key", pki["server.key"], "--tls-client-ca", pki["ca.pem"]]


def tls(pki, ca="ca", cert="client", server_name=None):
    """Trust ca; present cert (None: no client certificate)."""
    return ClientTLS(pki[f"{ca}.pem"], cert and pki[f"{cert}.pem"], cert and pki[f"{cert}.key"], server_name)


@pytest.fixture(scope="module")
def secure(pki, secure_redis, model_paths, tmp_path_factory):
    engine_link = ["--engine-tls-ca", pki["ca.pem"], "--engine-tls-cert", pki["client.pem"],
                   "--engine-tls-key", pki["client.key"]]
    with LocalDeployment(redis=secure_redis.url, log_dir=tmp_path_factory.mktemp("logs"), tls=tls(pki),
                         slm_args=["--model", str(model_paths["slm"]), *serving(pki)],
                         llm_args=["--model", str(model_paths["llm"]), *serving(pki)],
                         orchestrator_args=[*serving(pki), *engine_link, "--auth-token-file", pki["token"]]) as d:
        yield d


def health(address, link=None, token=None):
    with channel(address, link, token) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10).status


def refused(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value


def python_m(*args, env=None):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, **(env or {})))


def test_secure_deployment_generates_what_a_plain_one_does(secure, pki, engines):
    """Plain: the same models in this process, no gRPC at all; secure: every link encrypted, via the CLI."""
    plain = Orchestrator(LocalEngineClient(engines["slm"]), LocalEngineClient(engines["llm"]), MemorySessionStore())
    for prompt in PROMPTS[:3]:
        expected = plain.complete(opb.GenerationSpec(text=prompt, tau=0.3, max_new_tokens=30))
        out = python_m("rstitch.cli", "generate", "--orchestrator", secure.address, "--tls-ca", pki["ca.pem"],
                       "--tls-cert", pki["client.pem"], "--tls-key", pki["client.key"], "--tau", "0.3",
                       "--max-new-tokens", "30", "--json", prompt, env={"RSTITCH_TOKEN": TOKEN})
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["token_ids"] == [t for s in expected.spans for t in s.token_ids]


REFUSED = {
    "plaintext to a TLS port": lambda pki: None,
    "no client certificate, where mutual TLS wants one": lambda pki: tls(pki, cert=None),
    "a client certificate from a CA the server does not trust": lambda pki: tls(pki, cert="other-client"),
    "a server certificate from a CA the client does not trust": lambda pki: tls(pki, ca="other-ca"),
    "a server certificate that does not name example.com": lambda pki: tls(pki, server_name="example.com"),
}


@pytest.mark.parametrize("why", REFUSED)
def test_clients_without_the_right_certificates_are_refused(secure, pki, why):
    with RStitchClient(secure.address, timeout=10, tls=REFUSED[why](pki), token=TOKEN, retry_s=0) as client:
        assert refused(lambda: client.generate(PROMPTS[0], max_new_tokens=5)).code() == grpc.StatusCode.UNAVAILABLE


def test_the_server_name_can_be_overridden(secure, pki):
    assert health(secure.address, tls(pki, server_name="localhost")) == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("token, message", [(None, "requires metadata 'authorization: Bearer <token>'"),
                                            ("wrong", "bearer token is not valid")])
def test_calls_without_the_token_are_unauthenticated_but_health_stays_open(secure, pki, token, message):
    with RStitchClient(secure.address, timeout=10, tls=tls(pki), token=token) as client:
        for call in (lambda: client.generate(PROMPTS[0], max_new_tokens=5), lambda: client.session("x")):
            e = refused(call)
            assert e.code() == grpc.StatusCode.UNAUTHENTICATED and message in e.details()
    assert health(secure.address, tls(pki)) == health_pb2.HealthCheckResponse.SERVING


def outward_address() -> str | None:
    """This machine's address on its default route (no packet is sent), if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))
        except OSError:
            return None
        return None if s.getsockname()[0].startswith("127.") else s.getsockname()[0]


def test_a_token_travels_in_plaintext_to_loopback_only():
    unimplemented = orchestrator_pb2_grpc.OrchestratorServicer()  # every method answers UNIMPLEMENTED
    server, port = start_server(lambda s: orchestrator_pb2_grpc.add_OrchestratorServicer_to_server(unimplemented, s),
                                [], "0.0.0.0", 0, 2, interceptors=[BearerTokenInterceptor(TOKEN)])
    try:
        for token, code in ((TOKEN, grpc.StatusCode.UNIMPLEMENTED), (None, grpc.StatusCode.UNAUTHENTICATED)):
            with RStitchClient(f"127.0.0.1:{port}", timeout=10, token=token) as client:
                assert refused(lambda: client.cancel("x")).code() == code  # UNIMPLEMENTED: past the check
        if outward_address():  # anywhere else, grpc's local credentials refuse to send it
            with RStitchClient(f"{outward_address()}:{port}", timeout=10, token=TOKEN) as client:
                e = refused(lambda: client.cancel("x"))
            assert e.code() == grpc.StatusCode.UNAVAILABLE and "loopback" in e.details()
    finally:
        server.stop(None)


def test_engines_refuse_an_orchestrator_without_a_client_certificate(secure, pki):
    assert health(secure.slm.address, tls(pki)) == health_pb2.HealthCheckResponse.SERVING
    proc = python_m("orchestrator", "--slm", secure.slm.address, "--llm", secure.llm.address, "--port", "0",
                    "--engine-tls-ca", pki["ca.pem"], "--engine-wait", "3")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "want a client certificate it trusts" in proc.stderr, proc.stderr


def test_sessions_live_in_the_password_protected_redis(secure, pki, secure_redis):
    with RStitchClient(secure.address, tls=tls(pki), token=TOKEN) as client:
        session_id = client.generate(PROMPTS[1], max_new_tokens=10).session_id
    assert redis.Redis.from_url(secure_redis.url).exists(f"rstitch:{{{session_id}}}:meta")


def test_redis_speaks_tls(secure, secure_redis):
    if not redis_has_tls():
        pytest.skip("this redis-server is built without TLS: rediss:// is not tested")
    assert secure_redis.url.startswith("rediss://")  # so the deployment above stored its sessions over TLS


@pytest.mark.parametrize("change, message", [
    (lambda url: url.replace(quote(PASSWORD, safe=""), "wrong"), "invalid username-password pair"),
    # redis-py's words for it: "Authentication required" (RESP2), "... already authenticated ..." (RESP3)
    (lambda url: url.replace(f":{quote(PASSWORD, safe='')}@", ""), "authenticat"),
    (lambda url: url.split("?")[0], "certificate verify failed"),  # rediss:// verifies the server
], ids=["wrong password", "no password", "no CA for rediss"])
def test_a_bad_redis_url_stops_the_orchestrator_with_a_clear_message(secure_redis, change, message):
    url = change(secure_redis.url)
    if url == secure_redis.url:
        pytest.skip("plain redis: there is no CA to leave out")
    proc = python_m("orchestrator", "--redis", url, "--slm", "127.0.0.1:1", "--llm", "127.0.0.1:1", "--port", "0")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert message in proc.stderr.lower(), proc.stderr


@pytest.mark.parametrize("command, message", [
    (["rstitch.cli", "generate", "--tls-cert", "c.pem", "hi"], "--tls-cert needs --tls-key"),
    (["rstitch.cli", "session", "--tls-server-name", "x", "id"], "--tls-server-name needs TLS"),
    (["orchestrator", "--engine-tls-key", "k.pem"], "--engine-tls-key needs --engine-tls-cert"),
    (["orchestrator", "--auth-token-file", os.devnull], "is empty"),
    (["slm_service", "--tls-client-ca", "ca.pem"], "--tls-client-ca needs --tls-cert and --tls-key"),
    (["llm_service", "--tls-cert", "/no/such.pem", "--tls-key", "/no/such.key"], "No such file"),
])
def test_incomplete_security_flags_are_usage_errors(command, message):
    proc = python_m(*command)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
