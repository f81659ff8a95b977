"""TLS, mutual TLS and bearer tokens on the gRPC links, built only from grpc's own credential APIs.

Shared by the services and the client (this package is installed with both and stays torch-free).
Every option is off by default: a link without them is a plain loopback-style insecure channel.
"""

import argparse
import os
from dataclasses import dataclass

import grpc


def _read(path: str | None) -> bytes | None:
    if path is None:
        return None
    with open(path, "rb") as f:
        return f.read()


def _pair(a: str, a_value, b: str, b_value) -> None:
    if (a_value is None) != (b_value is None):
        given, missing = (a, b) if b_value is None else (b, a)
        raise ValueError(f"{given} needs {missing} as well (a certificate is useless without its private key)")


def server_credentials(cert: str, key: str, client_ca: str | None = None) -> grpc.ServerCredentials:
    """TLS with this certificate; with client_ca, mutual TLS: callers must present a certificate it signed."""
    _pair("a certificate", cert, "a private key", key)
    return grpc.ssl_server_credentials([(_read(key), _read(cert))], root_certificates=_read(client_ca),
                                       require_client_auth=client_ca is not None)


@dataclass(frozen=True)
class ClientTLS:
    """TLS on an outgoing link; a client certificate makes it mutual TLS."""

    ca: str | None = None  # roots to trust (None: the system's)
    cert: str | None = None
    key: str | None = None
    server_name: str | None = None  # name the server's certificate must carry, when it differs from the address

    def __post_init__(self):
        _pair("a client certificate", self.cert, "a client key", self.key)

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(_read(self.ca), _read(self.key), _read(self.cert))


def channel(address: str, tls: ClientTLS | None = None, token: str | None = None, options=()) -> grpc.Channel:
    """A channel to address: TLS when tls is given, else insecure; token is sent as `authorization: Bearer`."""
    credentials, options = channel_credentials(tls, token, options)
    if credentials is None:
        return grpc.insecure_channel(address, options)
    return grpc.secure_channel(address, credentials, options)


def channel_credentials(tls: ClientTLS | None, token: str | None, options=()) -> tuple[grpc.ChannelCredentials | None,
                                                                                        list]:
    """The credentials of a channel (None: insecure) and its options (a TLS server name override added)."""
    options = list(options)
    if tls is None and token is None:
        return None, options
    if tls is not None:
        credentials = tls.credentials()
        if tls.server_name:
            options.append(("grpc.ssl_target_name_override", tls.server_name))
    else:
        # A token must not cross a network in plain text: grpc's local credentials carry it, unencrypted,
        # only to a loopback address and refuse to connect anywhere else.
        credentials = grpc.local_channel_credentials(grpc.LocalConnectionType.LOCAL_TCP)
    if token is not None:
        credentials = grpc.composite_channel_credentials(credentials, grpc.access_token_call_credentials(token))
    return credentials, options


# --- command-line flags, the same in every program ------------------------------------------------


def readable_file(path: str) -> str:
    """argparse type of a file flag: a file that can be read now, so a wrong path stops the program
    with one line naming the flag, not at the first connection."""
    try:
        with open(path, "rb"):
            return path
    except (OSError, ValueError) as e:  # ValueError: a path with a NUL byte
        raise argparse.ArgumentTypeError(f"cannot read {path!r}: {getattr(e, 'strerror', None) or e}") from None


def _check_pem_files(parser: argparse.ArgumentParser, files: dict[str, str | None]) -> None:
    """The files given to these flags are readable PEM files; checked once the pairs are complete, so that
    a missing partner flag is the error shown first. (grpc itself takes any bytes, and fails much later.)"""
    for flag, path in files.items():
        if path is None:
            continue
        try:
            readable_file(path)
        except argparse.ArgumentTypeError as e:
            parser.error(f"argument {flag}: {e}")
        with open(path, "rb") as f:
            if b"-----BEGIN " not in f.read():
                parser.error(f"argument {flag}: {path!r} is not a PEM file (it has no -----BEGIN line)")


def _server_name(name: str) -> str:
    if not name or not name.isascii() or not name.isprintable() or " " in name:
        raise argparse.ArgumentTypeError(f"{name!r} is not a host name (ASCII, no spaces)")
    return name


def add_server_tls_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("TLS on the port this service listens on")
    g.add_argument("--tls-cert", metavar="FILE", help="serve TLS with this PEM certificate (chain)")
    g.add_argument("--tls-key", metavar="FILE", help="the certificate's PEM private key")
    g.add_argument("--tls-client-ca", metavar="FILE",
                   help="mutual TLS: refuse clients without a certificate signed by this CA")


def server_credentials_from_args(parser: argparse.ArgumentParser, args) -> grpc.ServerCredentials | None:
    if args.tls_cert is None and args.tls_key is None:
        if args.tls_client_ca is not None:
            parser.error("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS is TLS first)")
        return None
    try:
        _pair("--tls-cert", args.tls_cert, "--tls-key", args.tls_key)
        _check_pem_files(parser, {"--tls-cert": args.tls_cert, "--tls-key": args.tls_key,
                                 "--tls-client-ca": args.tls_client_ca})
        return server_credentials(args.tls_cert, args.tls_key, args.tls_client_ca)
    except (ValueError, OSError) as e:
        parser.error(str(e))


def add_client_tls_args(parser: argparse.ArgumentParser, prefix: str = "", what: str = "the server") -> None:
    """--{prefix}tls-ca, --{prefix}tls-cert, --{prefix}tls-key, --{prefix}tls-server-name."""
    g = parser.add_argument_group(f"TLS on the link to {what}")
    g.add_argument(f"--{prefix}tls-ca", metavar="FILE", help=f"use TLS and trust {what} if this PEM CA signed it")
    g.add_argument(f"--{prefix}tls-cert", metavar="FILE", help="mutual TLS: present this PEM client certificate")
    g.add_argument(f"--{prefix}tls-key", metavar="FILE", help="the client certificate's PEM private key")
    g.add_argument(f"--{prefix}tls-server-name", metavar="NAME", type=_server_name,
                   help="name the server's certificate must carry, when it differs from the address's host")


def client_tls_from_args(parser: argparse.ArgumentParser, args, prefix: str = "") -> ClientTLS | None:
    dest = prefix.replace("-", "_")
    ca, cert, key, name = (getattr(args, f"{dest}tls_{k}") for k in ("ca", "cert", "key", "server_name"))
    if ca is None and cert is None and key is None:
        if name:
            parser.error(f"--{prefix}tls-server-name needs TLS: give --{prefix}tls-ca (or a client certificate)")
        return None
    try:
        _pair(f"--{prefix}tls-cert", cert, f"--{prefix}tls-key", key)
        _check_pem_files(parser, {f"--{prefix}tls-ca": ca, f"--{prefix}tls-cert": cert, f"--{prefix}tls-key": key})
        tls = ClientTLS(ca, cert, key, name)
        tls.credentials()  # unreadable files are an error now, not at the first call
        return tls
    except (ValueError, OSError) as e:
        parser.error(str(e))


def add_token_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--token", default=os.environ.get("RSTITCH_TOKEN"),
                        help="bearer token for an orchestrator started with --auth-token-file "
                             "(default: $RSTITCH_TOKEN, which, unlike the flag, other users' `ps` cannot see)")
