"""relay: an outbound SMTP relay (smarthost) for applications that send a lot of mail."""

__version__ = "0.1.0"
