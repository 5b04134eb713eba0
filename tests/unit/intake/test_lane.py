"""intake.lane: which class and campaign a message gets, first match wins."""

import pytest

from relay.intake.lane import S550_BAD_CAMPAIGN, S550_BAD_CLASS, BadLabel, Labels, choose, header_fields


def message(*headers: str, body: str = "hello\r\n") -> bytes:
    return ("".join(h + "\r\n" for h in headers) + "Subject: x\r\n\r\n" + body).encode()


def test_default_is_transactional():
    assert choose(message("From: a@example.com")) == Labels("transactional", "", "")


def test_header_wins_over_listener_and_user():
    assert choose(message("X-Relay-Class: transactional"), listener="bulk", user="bulk").lane == "transactional"
    assert choose(message("x-relay-class:  BULK "), listener="transactional").lane == "bulk"


def test_listener_wins_over_user_and_campaign():
    assert choose(message("X-Relay-Campaign: spring"), listener="transactional", user="bulk").lane == "transactional"


def test_user_wins_over_campaign():
    assert choose(message("X-Relay-Campaign: spring"), user="transactional").lane == "transactional"
    assert choose(message(), user="bulk").lane == "bulk"


def test_a_campaign_makes_bulk():
    labels = choose(message("X-Relay-Campaign: Spring sale 2026", "X-Relay-Tenant: acme"))
    assert labels == Labels("bulk", "Spring sale 2026", "acme")


def test_unknown_class_is_refused_with_a_reply_that_says_what_is_allowed():
    with pytest.raises(BadLabel) as caught:
        choose(message("X-Relay-Class: urgent"))
    assert caught.value.reply == S550_BAD_CLASS
    assert caught.value.reply.startswith("550 5.6.0 ")
    assert '"transactional" or "bulk"' in caught.value.text


@pytest.mark.parametrize("name", ["x" * 65, "tab\there", "caf\u00e9"])
def test_bad_campaign_names_are_refused(name):
    with pytest.raises(BadLabel) as caught:
        choose(("X-Relay-Campaign: " + name + "\r\n\r\nbody\r\n").encode("utf-8"))
    assert caught.value.reply == S550_BAD_CAMPAIGN


def test_folded_first_field_wins_and_the_body_is_not_read():
    content = message("X-Relay-Campaign: big", "  one", "X-Relay-Campaign: other",
                      body="X-Relay-Class: bulk\r\n")
    assert header_fields(content) == {"campaign": "big one"}
    assert choose(content, listener="transactional").lane == "transactional"


def test_declared_fields_win_over_headers():
    labels = choose(message("X-Relay-Class: bulk", "X-Relay-Campaign: a"),
                    declared={"class": "transactional", "campaign": None})
    assert labels == Labels("transactional", "a", "")
