"""Starting a whole deployment on this machine as separate processes (used by `rstitch demo` and the tests).

Each service is started exactly as a user would start it (`python -m slm_service --port N`, ...),
on free loopback ports, and is up when its gRPC health service says SERVING.
"""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from urllib.parse import quote

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .security import ClientTLS, channel


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(address: str, process: subprocess.Popen | None, timeout: float, log: Path | None = None,
                 tls: ClientTLS | None = None) -> None:
    deadline = time.monotonic() + timeout
    with channel(address, tls) as health_channel:
        stub = health_pb2_grpc.HealthStub(health_channel)
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                tail = log.read_text()[-2000:] if log and log.exists() else ""
                raise RuntimeError(f"{' '.join(process.args)} exited with {process.returncode}:\n{tail}")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise TimeoutError(f"{address} was not healthy after {timeout:.0f} s")


class Redis:
    """A private redis-server on a free loopback port, keeping nothing on disk unless asked (AOF).

    password: require it (requirepass). tls: (cert, key, ca) PEM files: serve TLS only, on the same port;
    clients that present a certificate must have it signed by ca. `url` reaches the server either way.
    kill() and start() restart it on the same port and directory (with AOF: with what it had acknowledged).
    """

    def __init__(self, binary: str = "redis-server", appendonly: bool = False, password: str | None = None,
                 tls: tuple[str, str, str] | None = None):
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="rstitch-redis-")
        self.tls = tls
        args = [binary, "--bind", "127.0.0.1", "--save", "", "--dir", self.dir,
                "--appendonly", "yes" if appendonly else "no"]
        if appendonly:
            args += ["--appendfsync", "always"]
        auth = f":{quote(password, safe='')}@" if password else ""
        if password:
            args += ["--requirepass", password]
        if tls:
            cert, key, ca = tls
            args += ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", cert, "--tls-key-file", key,
                     "--tls-ca-cert-file", ca, "--tls-auth-clients", "optional"]
            self.url = f"rediss://{auth}127.0.0.1:{self.port}/0?ssl_ca_certs={quote(ca)}"
        else:
            args += ["--port", str(self.port)]
            self.url = f"redis://{auth}127.0.0.1:{self.port}/0"
        self.args = args
        try:
            self.start()
        except RuntimeError:
            self.stop()
            raise

    def start(self, timeout: float = 10):
        """Start the server and wait until it answers."""
        self.process = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    if self.tls:  # listening is enough; speaking TLS here would need a client of its own
                        return
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith((b"+PONG", b"-NOAUTH")):
                        return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def kill(self):
        """SIGKILL, keeping the directory (and so the AOF) for start()."""
        self.process.kill()
        self.process.wait()

    def stop(self):
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


class Service:
    """One service process; tls: how its health check reaches it when its args turn TLS on."""

    def __init__(self, name: str, args: list[str], port: int, log_dir: Path, env=None, tls: ClientTLS | None = None):
        self.name, self.port, self.address = name, port, f"127.0.0.1:{port}"
        self.log = log_dir / f"{name}.log"
        self.args = [sys.executable, "-m", name.split("#")[0], *args, "--port", str(port)]
        self.env = env
        self.tls = tls
        self.process = None
        self.start()

    def start(self):
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, env=self.env)

    def wait(self, timeout: float = 180):
        wait_healthy(self.address, self.process, timeout, self.log, self.tls)

    def stop(self, sig_kill: bool = False):
        if self.process and self.process.poll() is None:
            self.process.kill() if sig_kill else self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class LocalDeployment:
    """SLM engine, LLM engine, orchestrator (and Redis, if given a URL or a redis-server binary).

    Security options go in the services' args (--tls-cert, --engine-tls-ca, --auth-token-file, ...);
    tls is then what the health checks use to reach every service. env: variables set for all three
    (e.g. OTEL_EXPORTER_OTLP_ENDPOINT), beside this process's own. *_replicas: processes of each service;
    every orchestrator is given every engine replica, and `address` reaches every orchestrator.
    """

    def __init__(self, redis: str | None = "auto", slm_args=(), llm_args=(), orchestrator_args=(), log_dir=None,
                 tls: ClientTLS | None = None, env: dict[str, str] | None = None, slm_replicas: int = 1,
                 llm_replicas: int = 1, orchestrator_replicas: int = 1):
        self._stack = ExitStack()
        self.tls = tls
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix="rstitch-logs-"))
        self.redis_server: Redis | None = None  # the private redis-server, when this deployment started one
        self.redis_url = self._redis(redis)
        env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        try:
            self.slms = self._replicas("slm_service", slm_replicas, list(slm_args), env)
            self.llms = self._replicas("llm_service", llm_replicas, list(llm_args), env)
            for engine in self.slms + self.llms:  # started together, waited for together
                engine.wait()
            args = ["--slm", ",".join(s.address for s in self.slms), "--llm", ",".join(s.address for s in self.llms),
                    *orchestrator_args]
            if self.redis_url:
                args += ["--redis", self.redis_url]
            self.orchestrators = self._replicas("orchestrator", orchestrator_replicas, args, env)
            for orchestrator in self.orchestrators:
                orchestrator.wait()
        except BaseException:
            self.close()
            raise
        self.slm, self.llm, self.orchestrator = self.slms[0], self.llms[0], self.orchestrators[0]
        addresses = [o.address for o in self.orchestrators]
        self.address = addresses[0] if len(addresses) == 1 else "ipv4:" + ",".join(addresses)

    def _replicas(self, name, count, args, env) -> list[Service]:
        """`count` processes of a service, started (not waited for)."""
        return [self._service(name if i == 0 else f"{name}#{i + 1}", args, env) for i in range(count)]

    def _redis(self, redis):
        if redis != "auto":
            return redis
        if os.environ.get("REDIS_URL"):
            return os.environ["REDIS_URL"]
        binary = shutil.which("redis-server")
        if binary is None:
            return None
        self.redis_server = Redis(binary)
        self._stack.callback(self.redis_server.stop)
        return self.redis_server.url

    def _service(self, name, args, env):
        service = Service(name, args, free_port(), self.log_dir, env, self.tls)
        self._stack.callback(service.stop)
        return service

    def close(self):
        self._stack.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
