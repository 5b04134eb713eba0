"""relay.intake.policy: RFC 5321 paths, trust, relay refusal, routing domain."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.intake import policy, replies
from relay.intake.policy import BadDomain, Path, PathError, parse_path


def ok(text: str, utf8: bool = False) -> tuple[Path | None, str]:
    return parse_path(text, utf8=utf8)


def refused(text: str, utf8: bool = False) -> str:
    with pytest.raises(PathError) as info:
        parse_path(text, utf8=utf8)
    assert info.value.reply == info.value.args[0]
    return info.value.reply


# -- parse_path: well-formed paths ------------------------------------------


def test_angle_path():
    path, rest = ok("<a@b.c>")
    assert path == Path(address="a@b.c", local="a", domain="b.c", route="")
    assert rest == ""


def test_bare_mailbox_is_accepted():
    path, rest = ok("a@b.c")
    assert path.address == "a@b.c" and rest == ""


def test_bare_mailbox_with_params():
    path, rest = ok("a@b.c SIZE=1")
    assert path.address == "a@b.c" and rest == "SIZE=1"


def test_null_path():
    assert ok("<>") == (None, "")


def test_null_path_with_params():
    assert ok("<> SIZE=10 BODY=8BITMIME") == (None, "SIZE=10 BODY=8BITMIME")


@pytest.mark.parametrize("utf8", [False, True])
def test_params_after_path(utf8):
    path, rest = ok("<a@b.c> SIZE=10 BODY=8BITMIME", utf8)
    assert path.address == "a@b.c"
    assert rest == "SIZE=10 BODY=8BITMIME"


def test_surrounding_whitespace_and_extra_spaces_before_params():
    assert ok("  <a@b.c>  ") == (Path("a@b.c", "a", "b.c", ""), "")
    assert ok("<a@b.c>   SIZE=1")[1] == "SIZE=1"


def test_params_glued_to_the_path_are_refused():
    assert refused("<a@b.c>SIZE=1") == replies.S553_BAD_RCPT


@pytest.mark.parametrize(
    "text, local",
    [
        ('<"a b"@x.y>', '"a b"'),
        ('<"a@b"@x.y>', '"a@b"'),
        ('<"a%b"@x.y>', '"a%b"'),
        ('<"a\\"b"@x.y>', '"a\\"b"'),  # quoted-pair
        ('<""@x.y>', '""'),  # empty quoted string
    ],
)
def test_quoted_local_parts(text, local):
    path, _ = ok(text)
    assert path.local == local
    assert path.domain == "x.y"
    assert path.address == f"{local}@x.y"


def test_quoted_local_part_with_closing_bracket():
    path, rest = ok('<"a>b"@x.y> SIZE=1')
    assert (path.local, path.domain, rest) == ('"a>b"', "x.y", "SIZE=1")


def test_quoted_local_part_with_at_sign_keeps_the_real_domain():
    path, _ = ok('<"victim@elsewhere.example"@x.y>')
    assert path.domain == "x.y"


@pytest.mark.parametrize(
    "text, route, address",
    [
        ("<@a.b,@c.d:u@e.f>", "@a.b,@c.d:", "u@e.f"),
        ("<@a.b:u@c.d>", "@a.b:", "u@c.d"),
    ],
)
def test_source_route_is_kept(text, route, address):
    path, _ = ok(text)
    assert path.route == route
    assert path.address == address  # the route is not part of the address
    assert path.domain == address.split("@")[1]


@pytest.mark.parametrize("text", ["<@a.b,c.d:u@e.f>", "<@:a@b.c>", "<@[1.2.3.4]:u@c.d>", "<@a.b u@c.d>"])
def test_malformed_source_routes(text):
    assert refused(text) == replies.S553_BAD_RCPT


@pytest.mark.parametrize(
    "domain",
    ["[192.0.2.1]", "[IPv6:::1]", "[IPv6:2001:db8::1]", "[ipv6:::1]", "[IPv6:::ffff:192.0.2.1]"],
)
def test_address_literals(domain):
    path, _ = ok(f"<u@{domain}>")
    assert path.domain == domain
    assert path.address == f"u@{domain}"


@pytest.mark.parametrize(
    "domain",
    [
        "[300.1.1.1]",
        "[1.2.3]",
        "[01.2.3.4]",
        "[::1]",  # IPv6 needs the tag
        "[IPv6:zz]",
        "[IPv6:]",
        "[IPv6:1.2.3.4]",
        "[IPv4:1.2.3.4]",
        "[]",
        "[192.0.2.1 ]",
        "[1.2.3.4%eth0]",
        "[IPv6:fe80::1%eth0]",
        "[192.0.2.1",
    ],
)
def test_bad_address_literals(domain):
    assert refused(f"<u@{domain}>") == replies.S553_BAD_RCPT


@pytest.mark.parametrize(
    "text",
    [
        "<a\x00b@c.d>",
        "<a@c\x00.d>",
        '<"a\x00"@c.d>',
        '<"\\\x00"@c.d>',
        "<a\x01@c.d>",
        "<a\x1f@c.d>",
        '<"a\x7f"@c.d>',
        "<a\x7f@c.d>",
        "<a\tb@c.d>",
        "<a@b.c\n>",
        "<a@b.c\r>",
        "<a@b.c>\x00",
        "<a@b.c>\tSIZE=1",
        "a\x00@b.c",
    ],
)
@pytest.mark.parametrize("utf8", [False, True])
def test_control_characters_and_nul_are_refused(text, utf8):
    assert refused(text, utf8) == replies.S553_BAD_RCPT


@pytest.mark.parametrize(
    "text",
    ["<a@b.c", "a@b.c>", "<<a@b.c>>", "<a@ b.c>", "<a b@c.d>", "<@>", "<a>", "<a@>", "<@b.c>", "<a@b@c.d>"],
)
def test_malformed_paths(text):
    assert refused(text) == replies.S553_BAD_RCPT


@pytest.mark.parametrize("local", [".a", "a.", "a..b"])
def test_bad_dot_strings(local):
    assert refused(f"<{local}@b.c>") == replies.S553_BAD_RCPT


def test_atext_specials_are_allowed():
    local = "!#$%&'*+/=?^_`{|}~-.a1"
    path, _ = ok(f"<{local}@b.c>")
    assert path.local == local


# -- size limits ------------------------------------------------------------


@pytest.mark.parametrize("utf8", [False, True])
def test_local_part_64_octets_ok_65_refused(utf8):
    assert ok("<" + "x" * 64 + "@b.c>", utf8)[0].local == "x" * 64
    assert refused("<" + "x" * 65 + "@b.c>", utf8) == replies.S553_BAD_RCPT


def test_local_part_limit_counts_utf8_octets():
    # 32 two-octet characters = 64 octets; 33 = 66 octets.
    assert ok("<" + "é" * 32 + "@b.c>", utf8=True)[0] is not None
    assert refused("<" + "é" * 33 + "@b.c>", utf8=True) == replies.S553_BAD_RCPT


def _domain_of_length(n: int) -> str:
    """A valid domain of exactly n octets (labels of at most 62)."""
    labels = []
    while n > 63:
        labels.append("d" * 62)
        n -= 63
    labels.append("e" * n)
    return ".".join(labels)


@pytest.mark.parametrize("utf8", [False, True])
def test_path_of_256_octets_ok_257_refused(utf8):
    # "<" + 64 + "@" + 189 + ">" = 256 octets, the RFC 5321 4.5.3.1.3 limit.
    fits = "<" + "x" * 64 + "@" + _domain_of_length(189) + ">"
    assert len(fits) == 256
    assert ok(fits, utf8)[0].domain == _domain_of_length(189)
    too_long = "<" + "x" * 64 + "@" + _domain_of_length(190) + ">"
    assert len(too_long) == 257
    assert refused(too_long, utf8) == replies.S553_BAD_RCPT


def test_path_limit_counts_the_route():
    route = "@" + _domain_of_length(20) + ":"
    fits = "<" + route + "x" * 64 + "@" + _domain_of_length(189 - len(route)) + ">"
    assert len(fits) == 256
    assert ok(fits)[0].route == route
    too_long = "<" + route + "x" * 64 + "@" + _domain_of_length(190 - len(route)) + ">"
    assert refused(too_long) == replies.S553_BAD_RCPT


# -- domain labels ----------------------------------------------------------


@pytest.mark.parametrize(
    "domain", ["-b.c", "b-.c", "b.-c", "b.c-", "b..c", "b.c.", ".b.c", "b_c.d", "b c.d", "b.c..", "-"]
)
@pytest.mark.parametrize("utf8", [False, True])
def test_bad_domain_labels(domain, utf8):
    assert refused(f"<a@{domain}>", utf8) == replies.S553_BAD_RCPT


@pytest.mark.parametrize("domain", ["b", "b-c.d", "b--c.d", "1.2.3.example", "xn--bcher-kva.example", "B.C"])
def test_good_domain_labels(domain):
    assert ok(f"<a@{domain}>")[0].domain == domain


def test_label_of_63_octets_ok_64_refused_ascii_mode():
    assert ok("<a@" + "a" * 63 + ".com>")[0] is not None
    assert refused("<a@" + "a" * 64 + ".com>") == replies.S553_BAD_RCPT


def test_label_of_64_octets_refused_in_utf8_mode():
    assert refused("<a@" + "a" * 64 + ".com>", utf8=True) == replies.S553_BAD_RCPT


# -- non-ASCII (RFC 6531) ----------------------------------------------------


@pytest.mark.parametrize(
    "text", ["<ü@b.c>", "<a@bücher.example>", '<"ü"@b.c>', "ü@b.c", "<@bücher.example:a@b.c>"]
)
def test_non_ascii_without_smtputf8_is_553_5_6_7(text):
    reply = refused(text, utf8=False)
    assert reply == replies.S553_UTF8_NEEDS_SMTPUTF8
    assert reply.startswith("553 5.6.7 ")


def test_utf8_local_part_and_u_label_domain():
    path, rest = ok("<ü@bücher.example> SMTPUTF8", utf8=True)
    assert path == Path("ü@bücher.example", "ü", "bücher.example", "")
    assert rest == "SMTPUTF8"


def test_utf8_quoted_local_part():
    path, _ = ok('<"üser name"@b.c>', utf8=True)
    assert path.local == '"üser name"'


def test_a_label_domain_in_both_modes():
    for utf8 in (False, True):
        assert ok("<a@xn--bcher-kva.example>", utf8)[0].domain == "xn--bcher-kva.example"


@pytest.mark.parametrize("text", ["<\udc80@b.c>", "<a@b\udcff.c>"])
def test_invalid_utf8_is_a_path_error(text):
    assert refused(text, utf8=True).startswith("553 ")


@pytest.mark.parametrize("text", ["<a\u0085b@b.c>", '<"a\u0080"@b.c>', "<a\u009b@b.c>"])
def test_c1_controls_refused_in_utf8_mode(text):
    assert refused(text, utf8=True).startswith("553 ")


# -- property: a well-formed path always parses back to its parts ----------

_atext = st.sampled_from(list("abcXYZ019!#$%&'*+/=?^_`{|}~-"))
_atom = st.text(_atext, min_size=1, max_size=8)
_dot_string = st.lists(_atom, min_size=1, max_size=4).map(".".join).filter(lambda s: len(s) <= 64)
_label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
_domain = st.lists(_label, min_size=1, max_size=4).map(".".join)


@settings(max_examples=60, deadline=None)
@given(local=_dot_string, domain=_domain, params=st.sampled_from(["", "SIZE=1", "BODY=8BITMIME SMTPUTF8"]))
def test_roundtrip_property(local, domain, params):
    for text in (f"<{local}@{domain}> {params}", f"{local}@{domain} {params}"):
        for utf8 in (False, True):
            path, rest = parse_path(text, utf8=utf8)
            assert (path.local, path.domain, path.route) == (local, domain, "")
            assert path.address == f"{local}@{domain}"
            assert rest == params


@settings(max_examples=80, deadline=None)
@given(st.text(max_size=40))
def test_never_raises_anything_but_path_error_on_ascii_noise(text):
    text = text.encode("ascii", "ignore").decode()
    try:
        path, rest = parse_path(text, utf8=False)
    except PathError as exc:
        assert exc.reply.startswith("553 ")
    else:
        assert path is None or "@" in path.address


# -- is_trusted ---------------------------------------------------------------

NETS = tuple(
    ipaddress.ip_network(n) for n in ("127.0.0.0/8", "::1/128", "10.0.0.0/8", "2001:db8:1::/48")
)


@pytest.mark.parametrize(
    "ip, trusted",
    [
        ("127.0.0.1", True),
        ("127.255.255.254", True),
        ("10.1.2.3", True),
        ("128.0.0.1", False),
        ("192.0.2.1", False),
        ("::1", True),
        ("::2", False),
        ("2001:db8:1::25", True),
        ("2001:db8:2::25", False),
        ("::ffff:127.0.0.1", True),
        ("::ffff:10.1.2.3", True),
        ("::ffff:192.0.2.1", False),
        ("::127.0.0.1", False),  # IPv4-compatible, not mapped
        ("garbage", False),
        ("", False),
        ("127.0.0.1%eth0", False),
        (" 127.0.0.1", False),
        ("127.0.0.1:25", False),
    ],
)
def test_is_trusted(ip, trusted):
    assert policy.is_trusted(ip, NETS) is trusted


def test_is_trusted_with_no_networks():
    assert policy.is_trusted("127.0.0.1", ()) is False


# -- check_recipient and relay_trick ----------------------------------------


def path_of(text: str) -> Path:
    return parse_path(text, utf8=False)[0]


TRICKS = {
    "<a@b.example>": None,
    "<a%b.example@c.example>": "percent hack",
    "<b.example!a@c.example>": "bang path",
    '<"a@b.example"@c.example>': "quoted local part with @ or %",
    '<"a%b.example"@c.example>': "quoted local part with @ or %",
    "<@c.example:a@b.example>": "source route",
    "<@c.example,@d.example:a@b.example>": "source route",
}


@pytest.mark.parametrize("text", list(TRICKS))
def test_untrusted_client_may_send_nowhere(text):
    assert policy.check_recipient(path_of(text), may_relay=False) == replies.S550_RELAY_DENIED
    assert replies.S550_RELAY_DENIED.startswith("550 5.7.1 ")


@pytest.mark.parametrize("text", [t for t, trick in TRICKS.items() if trick != "source route"])
def test_trusted_client_is_accepted(text):
    assert policy.check_recipient(path_of(text), may_relay=True) is None


@pytest.mark.parametrize("text", [t for t, trick in TRICKS.items() if trick == "source route"])
def test_source_route_refused_even_when_trusted(text):
    reply = policy.check_recipient(path_of(text), may_relay=True)
    assert reply == replies.S550_ROUTE_DENIED
    assert reply.startswith("550 5.7.1 ")
    assert reply != replies.S550_RELAY_DENIED


@pytest.mark.parametrize("text, trick", list(TRICKS.items()))
def test_relay_trick_names(text, trick):
    assert policy.relay_trick(path_of(text)) == trick


def test_quoted_local_part_without_at_or_percent_is_not_a_trick():
    assert policy.relay_trick(path_of('<"a b"@c.example>')) is None


# -- routing_domain -----------------------------------------------------------


@pytest.mark.parametrize(
    "domain, expected",
    [
        ("example.com", "example.com"),
        ("EXAMPLE.Com", "example.com"),
        ("bücher.example", "xn--bcher-kva.example"),
        ("BÜCHER.example", "xn--bcher-kva.example"),
        ("Bücher.Example", "xn--bcher-kva.example"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        ("XN--BCHER-KVA.EXAMPLE", "xn--bcher-kva.example"),
        ("ß.de", "xn--zca.de"),  # IDNA 2008, not transitional
        ("[192.0.2.1]", "[192.0.2.1]"),
        ("[IPv6:::1]", "[ipv6:::1]"),
    ],
)
def test_routing_domain(domain, expected):
    assert policy.routing_domain(domain) == expected


def test_routing_domain_literals_are_not_idna_encoded():
    assert policy.routing_domain("[IPv6:2001:DB8::1]") == "[ipv6:2001:db8::1]"


@pytest.mark.parametrize("domain", ["b\u00a0c.example", "a\u2028.example", "bü_cher.de", "bücher..de", "\u0085.com"])
def test_routing_domain_bad_domain(domain):
    with pytest.raises(BadDomain):
        policy.routing_domain(domain)


def test_bad_domain_is_a_value_error():
    assert issubclass(BadDomain, ValueError)
