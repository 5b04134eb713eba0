"""The exception hierarchy of the relay.

Cores raise Local errors; the receive entry point of a protocol re-raises
them as Remote.  After ``deliver/`` failures are values, not exceptions.
"""


class RelayError(Exception):
    """Base of every error the relay raises on purpose."""


class ConfigError(RelayError, ValueError):
    """A bad configuration: the operator's fault, reported at startup."""


class ProtocolError(RelayError):
    """A peer broke a protocol."""


class LocalProtocolError(ProtocolError):
    """We were asked to do something the protocol does not allow."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow."""


class SpoolError(RelayError):
    """The spool could not store or read a message."""


class SpoolFull(SpoolError):
    """No room left on the spool's disk."""


class CorruptEntry(SpoolError):
    """A spool entry that cannot be decoded."""


class OwnerUnavailable(SpoolError):
    """The worker owning a shard slot did not take its part."""


class DeliveryError(RelayError):
    """A delivery attempt failed: the reply (made up for local failures,
    with code 0) and the stage it failed at.  Raised only inside deliver/;
    after it, failures are values (outcome.classify)."""

    def __init__(self, reply, stage) -> None:
        super().__init__(str(reply))
        self.reply = reply
        self.stage = stage


class TlsUnavailable(DeliveryError):
    """STARTTLS was not offered or its handshake failed."""
