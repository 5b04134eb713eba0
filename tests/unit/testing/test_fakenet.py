"""The fake internet, driven by real clients: dnspython for FakeDNS,
smtplib / aiosmtplib / raw sockets for the sinks.  Loopback only.

One FakeInternet runs in a background thread for the whole module; each
test takes sink addresses of its own (``ip`` fixture) and names under its
own label, so tests do not see each other's traffic.
"""

from __future__ import annotations

import asyncio
import itertools
import smtplib
import socket
import ssl
import time

import aiosmtplib
import dns.asyncresolver
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dns.resolver
import pytest

from relay.testing.fakenet import (
    S451_TRY_LATER,
    S550_NO_SUCH_USER,
    S554_NO_SERVICE,
    TLS_ABORT,
    TLS_ON,
    TLS_UNAVAILABLE,
    TLS_WRONG_CERT,
    Behaviour,
    FakeDNS,
    FakeInternet,
    Received,
    Rule,
    SinkFarm,
)

pytestmark = pytest.mark.slow  # real sockets and threads

CLIENT = "client.test"  # our EHLO name (smtplib would otherwise ask the system for its FQDN)


@pytest.fixture(scope="module")
def net():
    with FakeInternet() as internet:
        yield internet


_addresses = itertools.count(20)


@pytest.fixture
def ip() -> str:
    """A sink address no other test uses."""
    return f"127.0.0.{next(_addresses)}"


@pytest.fixture
def ip2() -> str:
    return f"127.0.0.{next(_addresses)}"


def resolver(port: int, lifetime: float = 2.0) -> dns.asyncresolver.Resolver:
    res = dns.asyncresolver.Resolver(configure=False)
    res.nameservers = ["127.0.0.1"]
    res.port = port
    res.lifetime = res.timeout = lifetime
    return res


def resolve(port: int, name: str, rdtype: str, lifetime: float = 2.0):
    return asyncio.run(resolver(port, lifetime).resolve(name, rdtype))


def ask(port: int, name: str, rdtype: str, tcp: bool = False, **query_options) -> dns.message.Message:
    """One raw query, to see rcode, flags and sections exactly."""
    query = dns.message.make_query(name, rdtype, **query_options)
    if tcp:
        return dns.query.tcp(query, "127.0.0.1", port=port, timeout=2)
    return dns.query.udp(query, "127.0.0.1", port=port, timeout=2, raise_on_truncation=False)


def smtp(ip: str, port: int, **kwargs) -> smtplib.SMTP:
    return smtplib.SMTP(ip, port, local_hostname=CLIENT, timeout=5, **kwargs)


class Raw:
    """Exactly the bytes we choose, one reply at a time."""

    def __init__(self, ip: str, port: int, source: str | None = None) -> None:
        self.sock = socket.create_connection(
            (ip, port), timeout=5, source_address=(source, 0) if source else None
        )
        self.buffer = b""

    def reply(self) -> tuple[int, list[str]]:
        lines = []
        while True:
            while b"\r\n" not in self.buffer:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError(f"closed after {lines!r}")
                self.buffer += chunk
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            lines.append(line[4:].decode())
            if line[3:4] != b"-":
                return int(line[:3]), lines

    def command(self, line: bytes) -> tuple[int, list[str]]:
        return self.send(line + b"\r\n")

    def send(self, data: bytes) -> tuple[int, list[str]]:
        self.sock.sendall(data)
        return self.reply()

    def closed(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


# -- FakeDNS -------------------------------------------------------------------


@pytest.fixture(scope="module")
def zone(net) -> FakeDNS:
    d = net.dns
    d.add_mx("mail.example", [(10, "mx1.mail.example"), (20, "mx2.mail.example")])
    d.add_a("mx1.mail.example", "127.0.0.10")
    d.add_a("mx1.mail.example", "127.0.0.11")
    d.add_aaaa("mx1.mail.example", "::1")
    d.add_txt("mail.example", "v=spf1 -all")
    d.add_null_mx("nomail.example")
    d.add_a("host.deep.sub.example", "127.0.0.12")
    return d


def test_mx_a_aaaa_txt(zone):
    mx = resolve(zone.port, "mail.example", "MX")
    assert sorted((r.preference, r.exchange.to_text()) for r in mx) == [
        (10, "mx1.mail.example."), (20, "mx2.mail.example."),
    ]
    assert mx.rrset.ttl == 300
    addresses = resolve(zone.port, "MX1.Mail.Example", "A")
    assert sorted(r.address for r in addresses) == ["127.0.0.10", "127.0.0.11"]
    assert [r.address for r in resolve(zone.port, "mx1.mail.example", "AAAA")] == ["::1"]
    assert [r.strings for r in resolve(zone.port, "mail.example", "TXT")] == [(b"v=spf1 -all",)]


def test_the_answer_is_authoritative_and_the_port_serves_udp_and_tcp(zone):
    for tcp in (False, True):
        answer = ask(zone.port, "mail.example", "MX", tcp=tcp)
        assert answer.flags & dns.flags.AA
        assert answer.rcode() == dns.rcode.NOERROR and len(answer.answer[0]) == 2


def test_null_mx(zone):
    (record,) = resolve(zone.port, "nomail.example", "MX")
    assert (record.preference, record.exchange.to_text()) == (0, ".")
    zone.add_mx("nomail.example", [(5, "mx.nomail.example")])  # a real MX replaces the null one
    mx = resolve(zone.port, "nomail.example", "MX")
    assert [r.exchange.to_text() for r in mx] == ["mx.nomail.example."]
    zone.add_null_mx("nomail.example")


def test_unknown_name_under_an_apex_is_nxdomain_with_the_soa(zone):
    with pytest.raises(dns.resolver.NXDOMAIN):
        resolve(zone.port, "nothing-here.example", "MX")
    answer = ask(zone.port, "nothing-here.example", "MX")
    assert answer.rcode() == dns.rcode.NXDOMAIN
    assert answer.authority[0].rdtype == dns.rdatatype.SOA
    assert answer.authority[0].name.to_text() == "example."


def test_set_nxdomain_overrides_records(zone):
    zone.add_a("gone.example", "127.0.0.13")
    zone.set_nxdomain("gone.example")
    with pytest.raises(dns.resolver.NXDOMAIN):
        resolve(zone.port, "gone.example", "A")
    zone.clear_fault("gone.example")
    assert [r.address for r in resolve(zone.port, "gone.example", "A")] == ["127.0.0.13"]


def test_nodata_for_a_missing_type_and_an_empty_non_terminal(zone):
    for name in ("mx1.mail.example", "deep.sub.example", "example"):
        with pytest.raises(dns.resolver.NoAnswer):
            resolve(zone.port, name, "MX")
        answer = ask(zone.port, name, "MX")
        assert answer.rcode() == dns.rcode.NOERROR and not answer.answer
        assert answer.authority[0].rdtype == dns.rdatatype.SOA


def test_servfail(zone):
    zone.set_servfail("broken.example")
    # One nameserver that fails: dnspython's resolver gives up on it.
    with pytest.raises(dns.resolver.NoNameservers):
        resolve(zone.port, "broken.example", "MX")
    assert ask(zone.port, "broken.example", "MX").rcode() == dns.rcode.SERVFAIL


def test_timeout_never_answers(zone):
    zone.set_timeout("slow.example")
    with pytest.raises(dns.resolver.LifetimeTimeout):
        resolve(zone.port, "slow.example", "MX", lifetime=0.3)
    with pytest.raises(dns.exception.Timeout):
        dns.query.tcp(dns.message.make_query("slow.example", "MX"), "127.0.0.1", port=zone.port, timeout=0.3)
    # The TCP server is still serving other names afterwards.
    assert ask(zone.port, "mail.example", "MX", tcp=True).rcode() == dns.rcode.NOERROR


def test_names_outside_every_apex_are_refused(zone):
    assert ask(zone.port, "example.org.invalid.zz", "A").rcode() == dns.rcode.REFUSED
    with pytest.raises(ValueError, match="add_apex"):
        zone.add_a("mx.elsewhere.zz", "127.0.0.1")
    zone.add_apex("elsewhere.zz")
    zone.add_a("mx.elsewhere.zz", "127.0.0.14")
    assert [r.address for r in resolve(zone.port, "mx.elsewhere.zz", "A")] == ["127.0.0.14"]


def test_long_txt_is_split_into_255_byte_strings(zone):
    text = "k=rsa; p=" + "A" * 600
    zone.add_txt("s1._domainkey.mail.example", text)
    (record,) = ask(zone.port, "s1._domainkey.mail.example", "TXT", tcp=True).answer[0]
    assert [len(s) for s in record.strings] == [255, 255, len(text) - 510]
    assert b"".join(record.strings) == text.encode()


def test_udp_truncates_at_512_bytes_or_the_edns_size(zone):
    for i in range(40):
        zone.add_a("many.example", f"127.0.1.{i}")  # 40 A records: ~680 bytes
    plain = ask(zone.port, "many.example", "A")
    assert plain.flags & dns.flags.TC and not plain.answer
    edns = ask(zone.port, "many.example", "A", use_edns=0, payload=1232)
    assert not edns.flags & dns.flags.TC and len(edns.answer[0]) == 40
    assert len(ask(zone.port, "many.example", "A", tcp=True).answer[0]) == 40


def test_the_resolver_falls_back_to_tcp_on_truncation(zone):
    zone.add_txt("big.example", "x" * 3000)
    before = zone.transports["tcp"]
    (record,) = resolve(zone.port, "big.example", "TXT")
    assert b"".join(record.strings) == b"x" * 3000
    assert zone.transports["tcp"] == before + 1
    assert zone.query_count("big.example", "TXT") == 2  # once over UDP (TC), once over TCP


def test_query_counters(zone):
    for _ in range(3):
        resolve(zone.port, "mail.example", "TXT")
    assert zone.query_count("MAIL.example.", "txt") >= 3
    assert zone.queries[("mail.example", "TXT")] == zone.query_count("mail.example", "TXT")


def test_a_garbled_query_gets_formerr(zone):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(2)
        sock.sendto(b"\x12\x34\x01\x00" + b"\x00\x01" + b"\xff" * 10, ("127.0.0.1", zone.port))
        reply = sock.recv(512)
    assert reply[:2] == b"\x12\x34" and reply[3] & 0x0F == dns.rcode.FORMERR


def test_fake_dns_runs_on_the_callers_loop():
    async def main():
        async with FakeDNS(apexes=["loop.test"]) as server:
            server.add_mx("loop.test", [(10, "mx.loop.test")])
            answer = await resolver(server.port).resolve("loop.test", "MX")
            return [r.exchange.to_text() for r in answer]

    assert asyncio.run(main()) == ["mx.loop.test."]


# -- sinks: accepting and recording ------------------------------------------------


def test_accepted_data_is_recorded_byte_exact(net, ip):
    sink = net.farm.add_sink(ip)
    client = Raw(ip, net.mx_port, source="127.0.0.5")
    assert client.reply()[0] == 220
    assert client.command(b"EHLO " + CLIENT.encode())[0] == 250
    assert client.command(b"MAIL FROM:<a@src.test>")[0] == 250
    assert client.command(b"RCPT TO:<b@dst.test>")[0] == 250
    assert client.command(b"RCPT TO:<c@dst.test>")[0] == 250
    assert client.command(b"DATA")[0] == 354
    # Dot-stuffed lines, a bare LF and a bare CR inside lines, 8-bit bytes,
    # an empty line, and a line that is just a stuffed dot.
    sent = b"Subject: t\r\n\r\n..leading dot\r\nbare\nlf and bare\rcr\r\n\xff\xfe8bit\r\n\r\n..\r\n"
    client.sock.sendall(sent + b".\r\n")
    code, text = client.reply()
    assert code == 250 and "queued" in text[0]
    client.command(b"QUIT")
    client.close()
    (message,) = sink.received
    assert message.data == b"Subject: t\r\n\r\n.leading dot\r\nbare\nlf and bare\rcr\r\n\xff\xfe8bit\r\n\r\n.\r\n"
    assert message == Received(
        mail_from="a@src.test", rcpt_tos=("b@dst.test", "c@dst.test"), data=message.data,
        peer_ip="127.0.0.5", tls=False, connection_id=message.connection_id, sink_ip=ip,
        helo=CLIENT, size=len(message.data),
    )
    assert message in net.farm.received
    assert sink.connections_opened == 1
    assert sink.transactions == {message.connection_id: 1}
    assert sink.peer_ips == {"127.0.0.5": 1}


def test_several_messages_per_connection_and_the_null_sender(net, ip):
    sink = net.farm.add_sink(ip)
    with smtp(ip, net.mx_port, source_address=("127.0.0.6", 0)) as client:
        for i in range(3):
            sender = "<>" if i == 0 else "s@src.test"
            client.sendmail(sender, [f"r{i}@dst.test"], f"Subject: {i}\r\n\r\nx\r\n")
    assert [m.mail_from for m in sink.received] == ["", "s@src.test", "s@src.test"]
    assert len({m.connection_id for m in sink.received}) == 1
    assert list(sink.transactions.values()) == [3]


# -- sinks: replies by pattern -------------------------------------------------------


def test_recipient_rules_answer_4xx_and_5xx(net, ip):
    sink = net.farm.add_sink(
        ip, Behaviour(rules={r"^bounce": S550_NO_SUCH_USER, r"^defer": S451_TRY_LATER})
    )
    with smtp(ip, net.mx_port) as client:
        refused = client.sendmail("s@src.test", ["bounce1@d.test", "defer1@d.test", "ok@d.test"], "x\r\n")
    assert refused == {
        "bounce1@d.test": (550, b"5.1.1 No such user"),
        "defer1@d.test": (451, b"4.3.0 Try later"),
    }
    (message,) = sink.received
    assert message.rcpt_tos == ("ok@d.test",)


def test_rules_at_mail_and_after_data(net, ip):
    sink = net.farm.add_sink(
        ip,
        Behaviour(rules=[
            Rule(r"^spammer@", "550 5.7.1 Sender rejected", at="MAIL"),
            (r"^later@", "452 4.2.2 Mailbox full", "DATA"),
        ]),
    )
    with smtp(ip, net.mx_port) as client:
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            client.sendmail("spammer@src.test", ["a@d.test"], "x\r\n")
        assert refused.value.smtp_code == 550
        client.rset()
        with pytest.raises(smtplib.SMTPDataError) as after_data:
            client.sendmail("s@src.test", ["a@d.test", "later@d.test"], "x\r\n")
        assert after_data.value.smtp_code == 452
        client.sendmail("s@src.test", ["a@d.test"], "x\r\n")
    assert [m.rcpt_tos for m in sink.received] == [("a@d.test",)]


def test_rules_change_at_runtime(net, ip):
    sink = net.farm.add_sink(ip)
    with smtp(ip, net.mx_port) as client:
        assert client.sendmail("s@src.test", ["x@d.test"], "1\r\n") == {}
        sink.configure(rules={".": "550 5.7.1 Go away"})
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            client.sendmail("s@src.test", ["x@d.test"], "2\r\n")
    assert len(sink.received) == 1


# -- sinks: throttling, delays, drops ----------------------------------------------


def test_421_and_close_after_k_messages_on_a_connection(net, ip):
    sink = net.farm.add_sink(ip, Behaviour(max_messages=2))
    client = smtp(ip, net.mx_port)
    for i in range(2):
        client.sendmail("s@src.test", ["r@d.test"], f"{i}\r\n")
    with pytest.raises(smtplib.SMTPSenderRefused) as refused:
        client.sendmail("s@src.test", ["r@d.test"], "3\r\n")
    assert refused.value.smtp_code == 421
    client.close()
    with smtp(ip, net.mx_port) as again:  # a new connection starts a new count
        again.sendmail("s@src.test", ["r@d.test"], "4\r\n")
    assert sorted(sink.transactions.values()) == [1, 2]
    assert sink.connections_opened == 2


def test_the_421_closes_the_connection(net, ip):
    net.farm.add_sink(ip, Behaviour(max_messages=0))
    client = Raw(ip, net.mx_port)
    client.reply()
    client.command(b"EHLO c.test")
    assert client.command(b"MAIL FROM:<s@src.test>")[0] == 421
    assert client.closed()
    client.close()


def test_slow_greeting_and_slow_replies(net, ip):
    sink = net.farm.add_sink(ip, Behaviour(greeting_delay=0.3))
    started = time.monotonic()
    client = smtp(ip, net.mx_port)
    assert time.monotonic() - started >= 0.28
    sink.configure(greeting_delay=0.0, reply_delay=0.15, data_delay=0.2)
    started = time.monotonic()
    client.ehlo()  # six lines, one reply: one delay
    assert 0.13 <= time.monotonic() - started < 0.6
    started = time.monotonic()
    client.noop()
    assert time.monotonic() - started >= 0.13
    client.mail("s@src.test")
    client.rcpt("r@d.test")
    started = time.monotonic()
    client.data(b"x\r\n")  # 354 after reply_delay, then reply_delay + data_delay
    assert time.monotonic() - started >= 0.45
    client.close()


def test_drop_in_data_after_n_bytes(net, ip):
    sink = net.farm.add_sink(ip, Behaviour(drop_in_data=100))
    with pytest.raises(smtplib.SMTPServerDisconnected):
        with smtp(ip, net.mx_port) as client:
            client.sendmail("s@src.test", ["r@d.test"], "x" * 50 + "\r\n" + "y" * 5000 + "\r\n")
    # A message shorter than the limit goes through.
    with smtp(ip, net.mx_port) as client:
        client.sendmail("s@src.test", ["r@d.test"], "short\r\n")
    assert [m.data for m in sink.received] == [b"short\r\n"]


def in_transaction(ip: str, port: int, greet: bytes = b"HELO c.test") -> Raw:
    """A client past the greeting, HELO/EHLO, MAIL and one RCPT."""
    client = Raw(ip, port)
    client.reply()
    client.command(greet)
    client.command(b"MAIL FROM:<s@src.test>")
    client.command(b"RCPT TO:<r@d.test>")
    return client


def test_drop_right_after_the_354(net, ip):
    net.farm.add_sink(ip, Behaviour(drop_in_data=0))
    client = in_transaction(ip, net.mx_port)
    assert client.command(b"DATA")[0] == 354
    assert client.closed()
    client.close()


# -- sinks: refusal and down ---------------------------------------------------------


def test_554_greeting_then_only_quit(net, ip):
    net.farm.add_sink(ip, Behaviour(greeting=S554_NO_SERVICE))
    with pytest.raises(smtplib.SMTPConnectError) as refused:
        smtp(ip, net.mx_port)
    assert refused.value.smtp_code == 554
    client = Raw(ip, net.mx_port)
    assert client.reply() == (554, ["5.7.1 No SMTP service here"])
    assert client.command(b"EHLO c.test")[0] == 503
    assert client.command(b"QUIT")[0] == 221
    assert client.closed()
    client.close()


def test_a_custom_220_greeting(net, ip):
    net.farm.add_sink(ip, Behaviour(greeting="220 mx.custom.example ESMTP ready"))
    client = Raw(ip, net.mx_port)
    assert client.reply() == (220, ["mx.custom.example ESMTP ready"])
    assert client.command(b"QUIT")[0] == 221
    client.close()


def test_421_greeting_closes(net, ip):
    net.farm.add_sink(ip, Behaviour(greeting="421 4.3.2 Not now"))
    client = Raw(ip, net.mx_port)
    assert client.reply()[0] == 421
    assert client.closed()
    client.close()


def test_a_down_sink_refuses_connections_and_comes_back(net, ip):
    sink = net.farm.add_sink(ip)
    open_client = smtp(ip, net.mx_port)
    sink.stop_listening()
    assert not sink.listening
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((ip, net.mx_port), timeout=2)
    with pytest.raises(smtplib.SMTPServerDisconnected):  # open connections went down with it
        open_client.noop()
    sink.start_listening()
    with smtp(ip, net.mx_port) as client:
        client.sendmail("s@src.test", ["r@d.test"], "back\r\n")
    assert len(sink.received) == 1


def test_a_sink_added_down_is_refused(net, ip):
    net.farm.add_sink(ip, listening=False)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((ip, net.mx_port), timeout=2)


# -- sinks: STARTTLS and PIPELINING ----------------------------------------------------


def test_starttls_with_the_test_ca(net, ip):
    sink = net.farm.add_sink(ip, Behaviour(tls=TLS_ON), hostnames=["mx1.tls.example"])
    with smtp(ip, net.mx_port) as client:
        client.ehlo()
        assert client.has_extn("starttls")
        client.starttls(context=net.farm.client_context())  # verifies the chain and the IP
        client.ehlo()
        assert not client.has_extn("starttls") and not client.has_extn("auth")
        client.sendmail("s@src.test", ["r@d.test"], "secret\r\n")
    assert sink.received[0].tls is True
    # The certificate also names the MX host, as a verifying relay checks it.
    client = Raw(ip, net.mx_port)
    client.reply()
    client.command(b"EHLO c.test")
    assert client.command(b"STARTTLS")[0] == 220
    with net.farm.client_context().wrap_socket(client.sock, server_hostname="mx1.tls.example") as tls:
        assert tls.getpeercert()["subjectAltName"][0] == ("DNS", "mx1.tls.example")


def test_starttls_with_a_certificate_from_another_ca_fails_verification(net, ip):
    sink = net.farm.add_sink(ip, Behaviour(tls=TLS_WRONG_CERT))
    with smtp(ip, net.mx_port) as client:
        with pytest.raises(ssl.SSLCertVerificationError):
            client.starttls(context=net.farm.client_context())
    assert not sink.received


def test_starttls_aborted_by_the_server(net, ip):
    net.farm.add_sink(ip, Behaviour(tls=TLS_ABORT))
    client = smtp(ip, net.mx_port)
    with pytest.raises((ssl.SSLError, smtplib.SMTPServerDisconnected, ConnectionError)):
        client.starttls(context=net.farm.client_context())
    client.close()


def test_starttls_offered_but_unavailable(net, ip):
    net.farm.add_sink(ip, Behaviour(tls=TLS_UNAVAILABLE))
    with smtp(ip, net.mx_port) as client:
        client.ehlo()
        assert client.has_extn("starttls")
        assert client.docmd("STARTTLS")[0] == 454
        client.sendmail("s@src.test", ["r@d.test"], "plain\r\n")  # and the session goes on


def test_starttls_not_offered_and_pipelining_on_or_off(net, ip, ip2):
    net.farm.add_sink(ip)
    net.farm.add_sink(ip2, Behaviour(pipelining=False, tls=TLS_ON))
    with smtp(ip, net.mx_port) as client:
        client.ehlo()
        assert not client.has_extn("starttls") and client.has_extn("pipelining")
    with smtp(ip2, net.mx_port) as client:
        client.ehlo()
        assert client.has_extn("starttls") and not client.has_extn("pipelining")


def test_pipelined_commands_get_their_replies_in_order(net, ip):
    sink = net.farm.add_sink(ip, Behaviour(rules={"^no": S550_NO_SUCH_USER}))
    client = Raw(ip, net.mx_port)
    client.reply()
    client.command(b"EHLO c.test")
    client.sock.sendall(b"MAIL FROM:<s@src.test>\r\nRCPT TO:<no@d.test>\r\nRCPT TO:<yes@d.test>\r\nDATA\r\n")
    client.buffer = client.sock.recv(65536)
    assert client.buffer.count(b"\r\n") == 4  # the four replies in one write, as an MX does
    assert [client.reply()[0] for _ in range(4)] == [250, 550, 250, 354]
    assert client.command(b"x\r\n.")[0] == 250
    client.close()
    assert sink.received[0].rcpt_tos == ("yes@d.test",)


def test_data_verdicts_and_the_command_sent_right_after_the_dot(net, ip):
    """The sink's DATA (relay.testing.sinkdata) answers as aiosmtpd does."""
    sink = net.farm.add_sink(ip, Behaviour(max_size=5000))
    client = Raw(ip, net.mx_port)
    client.reply()
    client.command(b"EHLO c.test")
    assert client.command(b"HELP DATA")[0] == 250
    assert client.command(b"MAIL FROM:<s@src.test>")[0] == 250
    assert client.command(b"DATA")[0] == 503  # no recipient yet
    assert client.command(b"RCPT TO:<r@d.test>")[0] == 250
    assert client.command(b"DATA now")[0] == 501
    assert client.command(b"DATA")[0] == 354
    client.sock.sendall(b"x" * 1200 + b"\r\nshort\r\n.\r\n")
    assert client.reply() == (500, ["Line too long (see RFC5321 4.5.3.1.6)"])
    client.command(b"MAIL FROM:<s@src.test>")
    client.command(b"RCPT TO:<r@d.test>")
    assert client.command(b"DATA")[0] == 354
    client.sock.sendall((b"y" * 70 + b"\r\n") * 80 + b".\r\n")  # 5,760 bytes: over max_size
    assert client.reply() == (552, ["Error: Too much mail data"])
    client.command(b"MAIL FROM:<s@src.test>")
    client.command(b"RCPT TO:<r@d.test>")
    assert client.command(b"DATA")[0] == 354
    client.sock.sendall(b"..kept\r\n.\r\nMAIL FROM:<t@src.test>\r\n")  # the next MAIL with the dot
    assert client.reply()[0] == 250
    assert client.reply()[0] == 250  # the MAIL sent with the dot was read as a command
    client.close()
    assert [m.data for m in sink.received] == [b".kept\r\n"]


def test_bdat_only_where_chunking_is_offered_and_its_chunks_always_read(net, ip, ip2):
    """RFC 3030: a chunk is read whatever its verdict, so the next command
    is never taken from the middle of a refused message."""
    plain = net.farm.add_sink(ip)
    client = Raw(ip, net.mx_port)
    client.reply()
    assert "CHUNKING" not in client.command(b"EHLO c.test")[1]
    assert client.command(b"BDAT 3 LAST")[0] == 500
    client.close()
    sink = net.farm.add_sink(ip2, Behaviour(chunking=True))
    client = Raw(ip2, net.mx_port)
    client.reply()
    assert "CHUNKING" in client.command(b"EHLO c.test")[1]
    assert client.command(b"HELP BDAT")[0] == 250
    assert client.send(b"BDAT 3 LAST\r\nQUI")[0] == 503  # no MAIL; "QUI" was the chunk
    assert client.command(b"BDAT x")[0] == 501
    assert client.command(b"BDAT 3 FIRST")[0] == 501
    client.command(b"MAIL FROM:<s@src.test>")
    assert client.send(b"BDAT 2\r\nno")[0] == 554  # no recipient: the transaction failed
    client.command(b"RCPT TO:<r@d.test>")
    assert client.send(b"BDAT 2 last\r\nno")[0] == 554  # ... until RSET
    client.command(b"RSET")
    client.command(b"MAIL FROM:<s@src.test>")
    client.command(b"RCPT TO:<r@d.test>")
    assert client.send(b"BDAT 6\r\n.dot\r\n")[0] == 250
    assert client.command(b"DATA")[0] == 503  # no DATA in a BDAT transaction
    assert client.send(b"BDAT 0 LAST\r\n")[0] == 250  # the message ends with an empty chunk
    assert client.command(b"HELO c.test")[0] == 250
    assert client.command(b"BDAT 1 LAST")[0] == 500  # no extensions after HELO
    client.close()
    assert [m.data for m in sink.received] == [b".dot\r\n"]
    assert [m.chunked for m in sink.received] == [True]
    assert plain.received == []


def test_drop_in_data_counts_every_chunk_of_a_bdat_message(net, ip):
    net.farm.add_sink(ip, Behaviour(chunking=True, drop_in_data=10))
    client = in_transaction(ip, net.mx_port, greet=b"EHLO c.test")  # BDAT needs EHLO
    assert client.send(b"BDAT 6\r\n12345\n")[0] == 250
    client.sock.sendall(b"BDAT 4 LAST\r\n1234")  # octets 7 to 10: the drop
    assert client.closed()


# -- the bundle ------------------------------------------------------------------------


def test_add_domain_wires_dns_to_the_sinks(net):
    sinks = net.add_domain("bundle.example", mx_ips=["127.0.0.200", "127.0.0.201"], preferences=[10, 20])
    assert [s.hostname for s in sinks] == ["mx1.bundle.example", "mx2.bundle.example"]
    mx = sorted(resolve(net.dns.port, "bundle.example", "MX"), key=lambda r: r.preference)
    host = mx[0].exchange.to_text()
    (address,) = resolve(net.dns.port, host, "A")
    with smtp(address.address, net.mx_port) as client:
        client.sendmail("s@src.test", ["r@bundle.example"], "via dns\r\n")
    assert sinks[0].wait_received(1)[0].data == b"via dns\r\n"
    overrides = net.config_overrides()
    assert overrides == {
        "dns": {"nameservers": [f"127.0.0.1:{net.dns.port}"]},
        "deliver": {"mx_port": net.mx_port},
    }
    # A second domain on the same hosts reuses the sinks.
    again = net.add_domain("other.example", mx_ips=["127.0.0.200"])
    assert again[0] is sinks[0] and "mx1.other.example" in sinks[0].hostnames


def test_a_standalone_farm_that_keeps_only_sizes(ip):
    with SinkFarm(keep_data=False) as farm:
        sink = farm.add_sink(ip)
        with smtp(ip, farm.port) as client:
            client.sendmail("s@src.test", ["r@d.test"], "body\r\n")
        (message,) = sink.wait_received(1)
    assert (message.data, message.size) == (b"", 6)


def test_wait_received_times_out(net, ip):
    sink = net.farm.add_sink(ip)
    with pytest.raises(TimeoutError):
        sink.wait_received(1, timeout=0.05)


def test_behaviour_is_validated():
    with pytest.raises(ValueError):
        Behaviour(tls="maybe")
    with pytest.raises(ValueError):
        Behaviour(rules={"x": "hello"})
    with pytest.raises(ValueError):
        Rule("x", "550 5.1.1 no", at="HELO")
    with pytest.raises(ValueError):
        Behaviour(reply_delay=-1)
    with pytest.raises(ValueError):
        SinkFarm().add_sink("10.0.0.1")


def test_the_farm_runs_on_the_callers_loop_with_aiosmtplib():
    async def main():
        async with FakeInternet() as internet:
            (sink,) = internet.add_domain("async.example", mx_ips=["127.0.0.250"])
            sink.configure(tls=TLS_ON)
            client = aiosmtplib.SMTP(
                hostname="127.0.0.250", port=internet.mx_port, local_hostname=CLIENT,
                start_tls=True, tls_context=internet.farm.client_context(),
            )
            async with client:
                await client.sendmail("s@src.test", ["r@async.example"], b"async\r\n")
            return list(sink.received)

    (message,) = asyncio.run(main())
    assert message.data == b"async\r\n" and message.tls
