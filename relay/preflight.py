"""Checks before a start (and ``relay --check``), as ``postfix check`` does.

Input: the settings.  Output: nothing, or a ``ConfigError`` naming the key
whose value cannot work on this host: a listen address that cannot be
bound, a TLS certificate or key, a DKIM key or a CA bundle that does not
load, an [http] address that cannot be bound or its
certificate, a source IP that is not an address of this host, a metrics address
that is taken.  Nothing here changes the spool: the start's recovery runs
only after these pass and the instance lock is held.
"""

from __future__ import annotations

import errno
import socket
import ssl

from relay.config import Settings, parse_hostport
from relay.dkim.sign import Signer
from relay.errors import ConfigError
from relay.intake.listener import open_http_socket, open_listen_sockets, server_tls_context


def check(settings: Settings) -> None:
    """Every check that needs no lock; raises ConfigError on the first failure."""
    for sock in open_listen_sockets(settings, listen=False):
        sock.close()
    server_tls_context(settings.tls)
    http = open_http_socket(settings, listen=False)
    if http is not None:
        http.close()
        server_tls_context(settings.http, "[http]")
    Signer.from_identities(settings.dkim)
    check_ca_file(settings.deliver.ca_file)
    check_source_ips(settings.relay.source_ips)


def check_ca_file(ca_file: str) -> None:
    if not ca_file:
        return
    try:
        ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"[deliver] ca_file: cannot load {ca_file}: {exc}") from None


def check_source_ips(addresses) -> None:
    """Each source IP must be bindable here: otherwise every delivery from
    it would fail (and defer) long after a start that looked fine."""
    for address in addresses:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((address, 0))
            except OSError as exc:
                if exc.errno == errno.EADDRNOTAVAIL:
                    raise ConfigError(
                        f"[relay] source_ips: {address} is not an address of this host"
                    ) from None
                raise ConfigError(
                    f"[relay] source_ips: cannot bind {address}: {exc.strerror}"
                ) from None


def open_metrics_socket(address: str) -> socket.socket | None:
    """The /metrics listener, bound and listening, or None when off."""
    if not address:
        return None
    host, port = parse_hostport(address)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(64)
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"[stats] metrics_address: cannot listen on {address}: {exc.strerror}"
        ) from None
    return sock
