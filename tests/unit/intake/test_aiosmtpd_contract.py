"""The parts of aiosmtpd that are not its public API but the intake relies on.

intake.handler subclasses ``aiosmtpd.smtp.SMTP``: it overrides methods
aiosmtpd calls (``_getaddr``, ``push``, ``handle_exception``, the
``smtp_*`` verbs, ``_timeout_cb``, ``_reset_timeout``, ``_authenticate`` and
the ``auth_*`` mechanisms), calls its helpers (``_call_handler_hook``,
``_set_post_data_state``, ``check_*_needed``), reads its attributes
(``session``, ``envelope``, ``transport``, ``loop``, ``_reader``,
``_writer``, ``_timeout_handle``, ``_timeout_duration``), replaces the
module's ``sanitized_log`` with one that first asks the logger, and peeks
into asyncio's ``StreamReader._buffer``.
intake.replies rewrites aiosmtpd's reply wording.  A new aiosmtpd release may
change any of these without notice; this file names each one so that the
change fails here, not in production.  (relay.testing.fakenet's
``_original_transport`` is listed too.)
"""

from __future__ import annotations

import asyncio
import inspect
import logging

import aiosmtpd.smtp
import pytest
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from relay.intake import handler, replies

# name -> (coroutine?, parameter names after self) of what we override or call.
SMTP_METHODS = {
    # overridden: aiosmtpd calls them, our versions must fit the call
    "connection_made": (False, ["transport"]),
    "connection_lost": (False, ["error"]),
    "data_received": (False, ["data"]),
    "push": (True, ["status"]),
    "handle_exception": (True, ["error"]),
    "smtp_EHLO": (True, ["hostname"]),
    "smtp_HELO": (True, ["hostname"]),
    "smtp_AUTH": (True, ["arg"]),
    "smtp_MAIL": (True, ["arg"]),
    "smtp_RCPT": (True, ["arg"]),
    "smtp_RSET": (True, ["arg"]),
    "smtp_DATA": (True, ["arg"]),
    "_getaddr": (False, ["arg"]),
    "_authenticate": (False, ["mechanism", "auth_data"]),
    "auth_PLAIN": (True, ["_", "args"]),
    "auth_LOGIN": (True, ["_", "args"]),
    "_timeout_cb": (False, []),
    "_reset_timeout": (False, ["duration"]),
    # called
    "_call_handler_hook": (True, ["command", "args"]),
    "_set_post_data_state": (False, []),
    "check_helo_needed": (True, ["helo"]),
    "check_auth_needed": (True, ["caller_method"]),
}

OVERRIDDEN = [name for name in SMTP_METHODS if name in vars(handler.RelaySMTP)]

# The keywords IntakeState.factory passes to SMTP.__init__.
INIT_KEYWORDS = [
    "data_size_limit", "enable_SMTPUTF8", "hostname", "ident", "tls_context",
    "timeout", "auth_require_tls", "authenticator",
]

# Where aiosmtpd calls what we override: (caller, text of the call).
CALL_SITES = [
    ("smtp_MAIL", "self._getaddr(arg)"),
    ("smtp_RCPT", "self._getaddr(arg)"),
    ("_handle_client", "self.handle_exception(error)"),
    ("_handle_client", "self.push("),
    # RelaySMTP._reset_timeout keeps one timer in the attribute aiosmtpd cancels when the connection goes
    ("connection_lost", "self._timeout_handle.cancel()"),
    ("_handle_client", "self._reset_timeout()"),
    # RelaySMTP._authenticate returns a coroutine that its auth_PLAIN/LOGIN
    # await: aiosmtpd's must hand back what _authenticate returned, as is.
    ("auth_PLAIN", 'return self._authenticate("PLAIN", LoginPassword(login, password))'),
    ("auth_LOGIN", 'return self._authenticate("LOGIN", LoginPassword(login, password))'),
    ("smtp_DATA", "self.envelope.content"),
    # handler._sanitized_log_if_enabled replaces the module's sanitized_log
    ("_handle_client", "sanitized_log(log.debug, '_handle_client readline: %r', line)"),
    ("_handle_client", "sanitized_log(log.info, '%r >> %r', self.session.peer, line)"),
    # handler._SENT_AT_ONCE: the reply after which aiosmtpd hangs up
    ("_handle_client", '"502 5.5.1 Too many unrecognized commands, goodbye."'),
]

SESSION_ATTRIBUTES = ["peer", "ssl", "host_name", "extended_smtp", "authenticated"]
ENVELOPE_ATTRIBUTES = ["mail_from", "mail_options", "rcpt_tos", "smtp_utf8", "content", "original_content"]


def _parameters(function) -> list[str]:
    return [name for name in inspect.signature(function).parameters if name != "self"]


@pytest.mark.parametrize("name", list(SMTP_METHODS))
def test_smtp_method_exists_with_the_expected_kind_and_parameters(name):
    coroutine, parameters = SMTP_METHODS[name]
    method = getattr(SMTP, name)
    assert inspect.iscoroutinefunction(method) is coroutine
    assert _parameters(method) == parameters


@pytest.mark.parametrize("name", OVERRIDDEN)
def test_our_overrides_match_what_aiosmtpd_calls(name):
    ours = vars(handler.RelaySMTP)[name]
    assert inspect.iscoroutinefunction(ours) is inspect.iscoroutinefunction(getattr(SMTP, name))
    assert len(_parameters(ours)) == len(_parameters(getattr(SMTP, name)))


def test_the_overrides_table_covers_the_subclass():
    # A new override of an aiosmtpd method must be added to SMTP_METHODS.
    inherited = {name for name in vars(handler.RelaySMTP) if hasattr(SMTP, name)} - {"__init__", "__doc__", "__module__"}
    assert inherited <= set(SMTP_METHODS)
    assert len(OVERRIDDEN) >= 12


def test_sanitized_log_is_ours_and_still_masks_what_it_logs(caplog, monkeypatch):
    assert aiosmtpd.smtp.sanitized_log is handler._sanitized_log_if_enabled
    signature = inspect.signature(handler._aiosmtpd_sanitized_log)
    assert list(signature.parameters) == ["func", "msg", "args", "kwargs"]
    sanitized = []
    real = aiosmtpd.smtp.sanitize
    monkeypatch.setattr(aiosmtpd.smtp, "sanitize", lambda text: sanitized.append(text) or real(text))
    logger = logging.getLogger("mail.log")
    line = b"AUTH PLAIN c2VjcmV0\r\n"
    aiosmtpd.smtp.sanitized_log(logger.info, "%r >> %r", "peer", line)
    assert sanitized == []  # mail.log is at WARNING: nothing logged, nothing to mask
    with caplog.at_level(logging.DEBUG, logger="mail.log"):
        aiosmtpd.smtp.sanitized_log(logger.info, "%r >> %r", "peer", line)
    assert sanitized == [line]
    assert [r.getMessage() for r in caplog.records] == ["'peer' >> b'AUTH PLAIN ********\\r\\n'"]


@pytest.mark.parametrize("caller, call", CALL_SITES)
def test_aiosmtpd_still_calls_what_we_override(caller, call):
    assert call in inspect.getsource(getattr(SMTP, caller))


def test_init_takes_the_keywords_the_factory_passes():
    parameters = inspect.signature(SMTP.__init__).parameters
    for name in INIT_KEYWORDS:
        assert parameters[name].kind is inspect.Parameter.KEYWORD_ONLY


def test_ehlo_hook_with_responses_is_the_new_style():
    # aiosmtpd passes `responses` only to a hook with five parameters.
    assert len(inspect.signature(handler.Handler.handle_EHLO).parameters) == 6  # self + 5
    assert "len(ehlo_hook_params) == 5" in inspect.getsource(SMTP.__init__)


class _Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closed = False

    def get_extra_info(self, name, default=None):
        return {"peername": ("127.0.0.1", 40000)}.get(name, default)

    def write(self, data) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


def test_instance_attributes_we_read():
    loop = asyncio.new_event_loop()
    try:
        server = SMTP(object(), loop=loop, timeout=42)
        assert server._timeout_duration == 42  # RelaySMTP._reset_timeout's default limit
        for name in ("loop", "transport", "session", "envelope", "_original_transport", "_timeout_handle"):
            assert hasattr(server, name), name
        assert server.transport is None  # RelaySMTP.connection_made tells TCP from STARTTLS by it
        transport = _Transport()
        server.connection_made(transport)
        assert server.transport is transport
        assert isinstance(server._reader, asyncio.StreamReader)
        assert isinstance(server._writer, asyncio.StreamWriter)
        assert isinstance(server._reader._buffer, bytearray)  # RelaySMTP._pipelined peeks at it
        assert isinstance(server.session, Session)
        assert isinstance(server.envelope, Envelope)
        for name in SESSION_ATTRIBUTES:
            assert hasattr(server.session, name), name
        for name in ENVELOPE_ATTRIBUTES:
            assert hasattr(server.envelope, name), name
        assert server.session.peer == ("127.0.0.1", 40000)
        server.connection_lost(None)
        assert server.transport is None
        loop.run_until_complete(asyncio.sleep(0))  # let the cancelled session task end
    finally:
        loop.close()


def test_auth_types():
    assert {"success", "handled", "auth_data"} <= set(inspect.signature(AuthResult).parameters)
    assert LoginPassword._fields == ("login", "password")


def test_reply_wording_we_rewrite_is_still_aiosmtpd_s():
    # replies.enhance() recognises aiosmtpd's replies by their start; a changed
    # wording would reach clients in aiosmtpd's words.
    source = inspect.getsource(aiosmtpd.smtp)
    for theirs, _ in replies._REWRITES:
        templated = theirs.replace("send HELO", "send {helo}")  # f'503 Error: send {helo} first'
        assert theirs in source or templated in source, theirs
