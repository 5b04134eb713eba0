"""relay.intake.received: the Received: trace header and protocol names."""

from __future__ import annotations

import email.utils
import re

import pytest

from relay.intake.received import protocol_name, received_header

WHEN = 1700000000.0


def header(**overrides) -> bytes:
    args = dict(
        helo="mail.example.com",
        peer_ip="192.0.2.1",
        hostname="relay.example.net",
        protocol="ESMTP",
        queue_id="18BC0F2A1B30001A2B",
        recipients=["a@b.example"],
        when=WHEN,
    )
    args.update(overrides)
    return received_header(**args)


def lines(raw: bytes) -> list[str]:
    assert raw.endswith(b"\r\n")
    text = raw.decode("ascii")
    assert "\n" not in text.replace("\r\n", "")
    assert "\r" not in text.replace("\r\n", "")
    return text[:-2].split("\r\n")


def date_of(raw: bytes) -> float:
    text = raw.decode("ascii").replace("\r\n\t", " ")
    return email.utils.parsedate_to_datetime(text.rsplit(";", 1)[1].strip()).timestamp()


def test_single_recipient_format():
    got = lines(header())
    assert got[0] == "Received: from mail.example.com ([192.0.2.1])"
    assert got[1] == "\tby relay.example.net (relay) with ESMTP id 18BC0F2A1B30001A2B"
    assert re.fullmatch(r"\tfor <a@b\.example>; \w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d [+-]\d{4}", got[2])
    assert len(got) == 3
    assert date_of(header()) == WHEN


def test_several_recipients_are_not_listed():
    raw = header(recipients=["a@b.example", "c@d.example"])
    got = lines(raw)
    assert got[1].endswith(" id 18BC0F2A1B30001A2B;")
    assert len(got) == 3 and got[2].startswith("\t") and "for" not in got[2]
    assert b"a@b.example" not in raw and b"c@d.example" not in raw
    assert date_of(raw) == WHEN


def test_non_ascii_single_recipient_is_not_listed():
    raw = header(recipients=["ü@bücher.example"])
    assert b"for <" not in raw
    assert lines(raw)[1].endswith(";")


def test_no_recipients():
    raw = header(recipients=[])
    assert b"for <" not in raw and date_of(raw) == WHEN


@pytest.mark.parametrize(
    "peer, literal",
    [("2001:db8::1", "[IPv6:2001:db8::1]"), ("::1", "[IPv6:::1]"), ("::ffff:192.0.2.1", "[IPv6:::ffff:192.0.2.1]")],
)
def test_ipv6_peer_is_an_ipv6_literal(peer, literal):
    assert lines(header(peer_ip=peer))[0] == f"Received: from mail.example.com ({literal})"


@pytest.mark.parametrize(
    "helo, shown",
    [
        ("bad helo", "bad?helo"),
        ("evil\r\nX-Injected: yes", "evil??X-Injected:?yes"),
        ("tab\there", "tab?here"),
        ("nul\0", "nul?"),
        ("bücher.example", "b?cher.example"),
        ("", "unknown"),
        ("[192.0.2.1]", "[192.0.2.1]"),
    ],
)
def test_unsafe_helo_characters_are_replaced(helo, shown):
    raw = header(helo=helo)
    assert lines(raw)[0] == f"Received: from {shown} ([192.0.2.1])"
    assert b"X-Injected" not in raw.split(b"\r\n", 1)[1]


def test_long_helo_is_truncated():
    first = lines(header(helo="h" * 2000))[0]
    assert first == "Received: from " + "h" * 255 + " ([192.0.2.1])"
    assert len(first) < 998


def test_unsafe_recipient_characters_are_replaced():
    raw = header(recipients=["a b\r\nX-Injected: 1@c.example"])
    got = lines(raw)
    assert len(got) == 3
    assert got[2].startswith("\tfor <a?b??X-Injected:?1@c.example>; ")


def test_header_is_ascii_even_with_a_non_ascii_hostname():
    raw = header(hostname="relay.tést")
    raw.decode("ascii")
    assert b"by relay.t?st (relay)" in raw


def test_every_line_is_short_enough():
    for line in lines(header(helo="h" * 300, recipients=["x" * 64 + "@" + "d" * 180])):
        assert len(line) <= 998


@pytest.mark.parametrize(
    "esmtp, tls, auth, name",
    [
        (False, False, False, "SMTP"),
        (False, True, True, "SMTP"),
        (True, False, False, "ESMTP"),
        (True, True, False, "ESMTPS"),
        (True, False, True, "ESMTPA"),
        (True, True, True, "ESMTPSA"),
    ],
)
def test_protocol_names(esmtp, tls, auth, name):
    assert protocol_name(esmtp, tls, auth) == name


def test_protocol_appears_in_the_header():
    assert " with ESMTPSA id " in lines(header(protocol=protocol_name(True, True, True)))[1]
