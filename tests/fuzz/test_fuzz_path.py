"""Fuzz: the intake's path parser (MAIL FROM / RCPT TO arguments), policy.parse_path."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

import targets

SEEDS = [
    "", "<>", "<> SIZE=10", "<a@b.example>", "a@b.example", "<a@b.example>SIZE=1",
    "<@hop1,@hop2:user@example.com>", '<"a>b"@example.com>', '<"a\\"b"@example.com>',
    "<user@[192.0.2.1]>", "<user@[IPv6:2001:db8::1]>", "<user@[999.1.1.1]>",
    "<üser@bücher.example>", "<user@xn--bcher-kva.example>", "<user%other@example.com>",
    "<a!b@example.com>", "<a@" + "x" * 64 + ".example>", "<" + "l" * 65 + "@example.com>",
    "<a@" + ".".join(["abcdefghij"] * 26) + ">", "<a@-bad-.example>", "<a@b..c>",
    "<a@b", "<a@b>>", "<a@b> <c@d>", "<a@\udcff.example>", "<a@K.example>",
]

_atext = st.sampled_from(list("abcXYZ09!#$%&'*+/=?^_`{|}~-.\"\\@<>[]:, ü\u00a0\udcff"))
_piece = st.text(_atext, max_size=12)
_label = st.one_of(
    st.text(st.sampled_from(list("abz09-üß\u0300K")), min_size=1, max_size=70),
    st.sampled_from(["xn--bcher-kva", "xn--", "xn--zz", "[1.2.3.4]", "[IPv6:::1]", "[x]"]),
)
_domain = st.lists(_label, min_size=1, max_size=4).map(".".join)
_params = st.lists(st.sampled_from(["SIZE=10", "BODY=8BITMIME", "SMTPUTF8", "X=", "="]), max_size=3)

paths = st.one_of(
    st.sampled_from(SEEDS),
    st.text(max_size=80),
    st.builds(
        lambda route, local, domain, params, bracket: (
            ("<" if bracket else "") + route + local + "@" + domain + (">" if bracket else "")
            + "".join(" " + p for p in params)
        ),
        st.sampled_from(["", "@a.example:", "@a,@b:", "@:"]), _piece, _domain, _params, st.booleans(),
    ),
)


@targets.fuzz_settings(600)
@given(text=paths, utf8=st.booleans())
def test_parse_path_properties(text, utf8):
    targets.check_path(text, utf8)


@targets.fuzz_settings(200)
@given(data=st.binary(max_size=120))
def test_parse_path_raw_bytes(data):
    targets.run_path(data)
