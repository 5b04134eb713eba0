"""Listen sockets and TLS contexts for the SMTP intake.

Input: ``[[listen]]`` addresses and ``[tls]``.  Output: bound, listening
sockets with SO_REUSEPORT, so every worker opens its own socket on each
address and the kernel spreads new connections across the workers; and
the server-side SSL context for STARTTLS.
"""

from __future__ import annotations

import socket
import ssl

from relay.config import Settings
from relay.errors import ConfigError

def open_listen_socket(host: str, port: int, listen: bool = True, backlog: int = 4096) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        if listen:  # a bound socket that does not listen is given no connections
            sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def open_listen_sockets(settings: Settings, listen: bool = True) -> list[socket.socket]:
    sockets = []
    try:
        for item in settings.listen:
            sockets.append(open_listen_socket(*item.address, listen=listen,
                                              backlog=settings.relay.listen_backlog))
    except OSError as exc:
        for sock in sockets:
            sock.close()
        host, port = item.address
        raise ConfigError(f"[[listen]] address: cannot listen on {host}:{port}: {exc.strerror}") from None
    return sockets


def open_http_socket(settings: Settings, listen: bool = True) -> socket.socket | None:
    """The ``[http] address`` socket (SO_REUSEPORT, like SMTP's), or None
    when there is no ``[http]``."""
    if settings.http is None:
        return None
    host, port = settings.http.address
    try:
        return open_listen_socket(host, port, listen=listen, backlog=settings.relay.listen_backlog)
    except OSError as exc:
        raise ConfigError(f"[http] address: cannot listen on {host}:{port}: {exc.strerror}") from None


def server_tls_context(tls, label: str = "[tls]") -> ssl.SSLContext | None:
    """The STARTTLS context from ``[tls]`` (config.TlsSettings), or None
    when it is absent: STARTTLS is not offered then.  ``[http]`` uses it
    too, with its own label, when it has a cert_file."""
    if tls is None or not tls.cert_file:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(tls.cert_file, tls.key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"{label} cert_file/key_file: cannot load {tls.cert_file} / {tls.key_file}: {exc}"
        ) from None
    return context
