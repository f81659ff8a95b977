"""Command-line flags of the three services: argparse types that refuse impossible values, and the parser.

Each type is an argparse `type=` callable: it returns the parsed value or raises ArgumentTypeError,
which the parser turns into one line, `prog: error: argument --flag: why`, and exit status 2. A
service therefore either starts with values it can run with or stops before doing anything.
"""

import argparse
import ipaddress
import math
import os
import re
import socket
import sys
from typing import NoReturn
from urllib.parse import urlsplit

# Beside the TLS flags it checks too, in the client package (which cannot import this one).
from rstitch.security import readable_file

PORT_MAX = 65535
INT32_MAX = 2**31 - 1  # counts: what the C layers below (gRPC, torch) take as an int
UINT32_MAX = 2**32 - 1  # token counts: the proto's uint32 fields
YEAR_S = 365 * 24 * 3600  # durations: past this they are typos, and Redis and thread timeouts overflow
REDIS_SCHEMES = ("redis", "rediss", "unix")
_LABEL = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
_HOSTNAME = re.compile(rf"{_LABEL}(\.{_LABEL})*\.?", re.ASCII)
_DEVICE = re.compile(r"cpu|(cuda|xpu)(:\d+)?|mps", re.ASCII)


def shown(text: str) -> str:
    """A value as an error message quotes it: on one line and short."""
    return repr(text) if len(text) <= 40 else repr(text[:37]) + "..."


def one_line(message) -> str:
    return " ".join(str(message).split())


def integer(low: int, high: int = INT32_MAX):
    """A whole number in [low, high]."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be a whole number in [{low}, {high}], got {shown(text)}")
        return value

    return parse


def number(low: float, high: float, low_open: bool = False):
    """A finite number in [low, high], or in (low, high] with low_open."""
    def parse(text: str) -> float:
        try:
            value = float(text) + 0.0  # + 0.0: -0.0 is 0
        except ValueError:
            value = math.nan
        if not (low < value <= high if low_open else low <= value <= high):
            bounds = f"{'(' if low_open else '['}{_plain(low)}, {_plain(high)}]"
            raise argparse.ArgumentTypeError(f"must be a finite number in {bounds}, got {shown(text)}")
        return value

    return parse


def _plain(bound: float) -> str:
    """31536000, not 3.1536e+07."""
    return str(int(bound)) if float(bound).is_integer() else str(bound)


port = integer(0, PORT_MAX)
fraction = number(0, 1, low_open=True)


def seconds(minimum: float = 0, low_open: bool = False):
    """A duration in seconds, from minimum to a year."""
    return number(minimum, YEAR_S, low_open)


def text(value: str) -> str:
    """A name shown to others (in Info, in logs): not blank, and UTF-8 (the proto's strings are)."""
    try:
        value.encode()
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError(f"{shown(value)} is not valid UTF-8") from None
    if not value.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return value


def device(value: str) -> str:
    """A torch device name; whether this machine has it is checked when the model loads."""
    if not _DEVICE.fullmatch(value):
        raise argparse.ArgumentTypeError(f"{shown(value)} is not a device: use cpu, cuda, cuda:N, mps or xpu[:N]")
    return value


def _ip(name: str) -> str | None:
    """name as gRPC addresses it (IPv6 in brackets) if it is an IP address, else None."""
    try:
        address = ipaddress.ip_address(name[1:-1] if name.startswith("[") and name.endswith("]") else name)
    except ValueError:
        return None
    return f"[{address}]" if address.version == 6 else str(address)


def _host_syntax(name: str) -> str:
    """An IP address or a DNS name, refusing what looks like an address but is none (999.1.1.1) and the
    old forms the C library still reads as one (0x7f.1, 10.1): gRPC and the C library read them apart."""
    ip = _ip(name)
    if ip is not None:
        return ip
    numeric = all(label.isdigit() for label in name.rstrip(".").split("."))
    if len(name) > 253 or not _HOSTNAME.fullmatch(name) or numeric or _libc_numeric(name):
        raise argparse.ArgumentTypeError(f"{shown(name)} is neither an IP address nor a host name")
    return name


def _libc_numeric(name: str) -> bool:
    try:
        socket.getaddrinfo(name, None, flags=socket.AI_NUMERICHOST)
    except (OSError, UnicodeError):
        return False
    return True


def host(value: str) -> str:
    """An address to listen on: an IP address, or a name this machine resolves."""
    ip = _ip(value)
    if ip is not None:
        return ip
    name = _host_syntax(value)
    try:
        socket.getaddrinfo(name, None)
    except (OSError, UnicodeError):
        raise argparse.ArgumentTypeError(f"host name {shown(name)} does not resolve") from None
    return name


def engine_addresses(value: str) -> str:
    """HOST:PORT[,HOST:PORT...]; names are not resolved now: a replica may come up after us."""
    addresses = []
    for address in value.split(","):
        name, colon, number_text = address.strip().rpartition(":")
        if not colon or not name:
            raise argparse.ArgumentTypeError(f"{shown(address)} is not HOST:PORT (IPv6: [ADDRESS]:PORT)")
        try:
            engine_port = integer(1, PORT_MAX)(number_text)
        except argparse.ArgumentTypeError as e:
            raise argparse.ArgumentTypeError(f"the port of {shown(address)} {e}") from None
        addresses.append(f"{_host_syntax(name)}:{engine_port}")
    return ",".join(addresses)


def redis_url(value: str) -> str:
    """redis://[:PASSWORD@]HOST[:PORT][/DB][?OPTIONS], rediss://... (TLS) or unix://PATH[?db=DB]: checked as
    redis-py reads it, short of connecting. Messages never quote the URL: it may hold a password."""
    import redis

    try:
        parts = urlsplit(value)
        if parts.scheme not in REDIS_SCHEMES:
            raise ValueError("it must start with redis://, rediss:// (TLS) or unix://")
        if parts.scheme == "unix" and not parts.path:
            raise ValueError("unix:// needs the socket's path")
        if parts.scheme != "unix":
            _host_syntax(parts.hostname or "")
            parts.port  # noqa: B018 (raises ValueError when out of range)
            if parts.path.strip("/") and not parts.path.strip("/").isdigit():
                raise ValueError(f"the database {shown(parts.path.strip('/'))} is not a number")
        pool = redis.ConnectionPool.from_url(value)
        _check_redis_options(pool.connection_kwargs)
        pool.make_connection()  # refuses options the connection does not take; connects only when used
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"the URL's host: {e}") from None
    except (ValueError, TypeError, redis.RedisError) as e:
        raise argparse.ArgumentTypeError(f"not a Redis URL: {one_line(e)}") from None
    return value


REDIS_FILE_OPTIONS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")


def _check_redis_options(options: dict) -> None:
    if options.get("db", 0) < 0:
        raise ValueError(f"the database {options['db']} is negative")
    for name in REDIS_FILE_OPTIONS:
        if name in options:
            try:
                readable_file(options[name])
            except argparse.ArgumentTypeError as e:
                raise ValueError(f"{name}: {e}") from None
    for name, value in options.items():  # timeouts and intervals
        if isinstance(value, float) and not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name}={value} is not a finite number >= 0")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, unless it has none or its help already tells it."""

    def _get_help_string(self, action):
        if action.default is None or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse with defaults in --help and every usage error on one line (no usage block above it)."""

    def __init__(self, **kwargs):
        super().__init__(formatter_class=HelpFormatter, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        for arg in args:
            if arg.startswith("--") and arg.endswith("=--"):  # Python 3.11's argparse gives such a flag []
                self.error(f"argument {arg[:-3]}: expected one argument")
        return super().parse_known_args(args, namespace)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {one_line(message)}\n")


def env_default(parser: argparse.ArgumentParser, flag: str, variable: str, parse, fallback=None):
    """A flag's default taken from $variable, refused as the flag's own value would be."""
    raw = os.environ.get(variable)
    if not raw:
        return fallback
    try:
        return parse(raw)
    except argparse.ArgumentTypeError as e:
        parser.error(f"argument {flag} (from ${variable}): {e}")


def check_ports_differ(parser: argparse.ArgumentParser, args) -> None:
    if args.metrics_port and args.metrics_port == args.port:
        parser.error(f"argument --metrics-port: {args.port} is --port already; metrics need a port of their own")


def exit_on_failure(service: str, message) -> NoReturn:
    """Stop a service that cannot start, with one line that says why (and no traceback)."""
    sys.exit(f"{service}: {one_line(message)}")
