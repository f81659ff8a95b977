"""uvicorn serving the HTTP API on a thread of its own (with its own event loop) beside the gRPC server.

The socket is bound and the TLS files read before anything is served, so that a port in use or a bad
certificate stops the orchestrator at start-up, with one line, like every other flag.
"""

import socket
import ssl
import threading
import time

import uvicorn

GRACE_S = 5  # as the gRPC server's: in-flight requests get this long at shutdown
START_TIMEOUT_S = 30


class HttpServer:
    def __init__(self, app, host: str, port: int, tls_cert: str | None = None, tls_key: str | None = None,
                 tls_client_ca: str | None = None):
        """host as the gRPC flags take it (an IPv6 address in brackets); port 0 picks a free one.
        OSError: the address cannot be bound; ssl.SSLError: the TLS files do not make a context."""
        self.socket = _listening(host, port)
        try:
            config = uvicorn.Config(
                app, log_config=None, access_log=False, lifespan="off", ws="none",
                timeout_graceful_shutdown=GRACE_S, ssl_certfile=tls_cert, ssl_keyfile=tls_key,
                ssl_ca_certs=tls_client_ca, ssl_cert_reqs=ssl.CERT_REQUIRED if tls_client_ca else ssl.CERT_NONE)
            config.load()
        except BaseException:
            self.socket.close()
            raise
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, name="http",
                                       daemon=True)

    @property
    def port(self) -> int:
        return self.socket.getsockname()[1]

    def start(self) -> None:
        """Serve, and return once serving (RuntimeError: the server stopped during its start-up)."""
        self.thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the HTTP server did not start (see the log above)")
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(GRACE_S + 5)


def _listening(host: str, port: int) -> socket.socket:
    """A TCP socket listening on host:port, where connections queue until the server accepts them."""
    family, kind, proto, _, address = socket.getaddrinfo(host.removeprefix("[").removesuffix("]"), port,
                                                         type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restarts do not wait out TIME_WAIT
        sock.bind(address)
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock
