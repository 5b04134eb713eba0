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
