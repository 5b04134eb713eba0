"""perf.options: what --dkim and --tls add to the relay's and Postfix's configs (pure)."""

from __future__ import annotations

from perf import options as bench
from perf.farm import layout

FILES = bench.Files(
    dkim_keys=(("ed25519-sha256", "bench-ed25519", "/run/ed.pem"),
               ("rsa-sha256", "bench-rsa2048", "/run/rsa.pem")),
    intake_cert="/run/intake.crt", intake_key="/run/intake.key", intake_ca="/run/intake-ca.crt",
)
SINKS_CA = "/run/sinks/ca.crt"


def test_no_options_add_nothing():
    off = bench.Options()
    assert off.names() == []
    assert bench.relay_overrides(off, bench.Files(), "") == {}
    assert bench.postfix_main_cf(off, bench.Files(), "") == {}
    assert bench.client_context(bench.Files()) is None


def test_dkim_gives_the_relay_two_identities_of_the_sender_domain():
    doc = bench.relay_overrides(bench.Options(dkim=True), FILES, SINKS_CA)
    assert list(doc) == ["dkim"]
    assert doc["dkim"] == [
        {"domain": "sender.example", "selector": "bench-ed25519", "key_file": "/run/ed.pem",
         "algorithm": "ed25519-sha256"},
        {"domain": "sender.example", "selector": "bench-rsa2048", "key_file": "/run/rsa.pem",
         "algorithm": "rsa-sha256"},
    ]
    assert {algorithm for algorithm, _, _ in bench.DKIM_KEYS} == {"ed25519-sha256", "rsa-sha256"}
    assert dict((a, bits) for a, _, bits in bench.DKIM_KEYS)["rsa-sha256"] == 2048


def test_tls_offers_starttls_and_delivers_in_verify_mode():
    doc = bench.relay_overrides(bench.Options(tls=True), FILES, SINKS_CA)
    assert doc == {"tls": {"cert_file": "/run/intake.crt", "key_file": "/run/intake.key"},
                   "deliver": {"tls": "verify", "ca_file": SINKS_CA}}


def test_tls_for_postfix():
    main_cf = bench.postfix_main_cf(bench.Options(tls=True, dkim=True), FILES, SINKS_CA)
    assert main_cf["smtpd_tls_cert_file"] == "/run/intake.crt"
    assert main_cf["smtpd_tls_key_file"] == "/run/intake.key"
    assert main_cf["smtpd_tls_security_level"] == "may"
    assert main_cf["smtp_tls_security_level"] == "verify"
    assert main_cf["smtp_tls_CAfile"] == SINKS_CA
    assert bench.postfix_main_cf(bench.Options(dkim=True), FILES, SINKS_CA) == {}


def test_postfix_verifies_each_static_hop_against_its_mx_name():
    farm = layout(domains=4, sites=2)
    policy = bench.postfix_tls_policy(farm.routes(2525), farm.mx_names())
    assert policy == ("[127.0.0.10]:2525 verify match=mx.p000.example\n"
                      "[127.0.0.11]:2525 verify match=mx.p001.example\n")


def test_merge_keeps_the_scenario_settings_and_replaces_arrays():
    base = {"deliver": {"max_messages_per_connection": 10}, "dkim": [{"selector": "old"}]}
    merged = bench.merge(base, {"deliver": {"tls": "verify"}, "dkim": [{"selector": "new"}],
                                "tls": {"cert_file": "c"}})
    assert merged == {"deliver": {"max_messages_per_connection": 10, "tls": "verify"},
                      "dkim": [{"selector": "new"}], "tls": {"cert_file": "c"}}
    assert base == {"deliver": {"max_messages_per_connection": 10}, "dkim": [{"selector": "old"}]}


def test_describe_says_the_postfix_figure_is_unsigned(monkeypatch):
    monkeypatch.setattr(bench, "postfix_signs", lambda: (False, "unsigned: OpenDKIM is not installed"))
    both = bench.describe(bench.Options(dkim=True, tls=True), postfix=True)
    assert both["dkim"] is True and both["tls"] is True
    assert len(both["relay"]["dkim"]) == 2
    assert both["postfix"]["dkim"] == "unsigned: OpenDKIM is not installed"
    assert "verify" in both["postfix"]["tls"]
    line = bench.summary(both)
    assert "DKIM" in line and "Postfix unsigned" in line and "STARTTLS" in line
    plain = bench.describe(bench.Options(), postfix=False)
    assert "postfix" not in plain and plain["relay"] == {"dkim": None, "tls": None, "chunking": None}
    assert bench.summary(plain) == "options: none (no DKIM, no TLS, no CHUNKING)"
    assert bench.summary(None) == "options: none (no DKIM, no TLS, no CHUNKING)"  # JSON from before


def test_chunking_is_the_sinks_offer_and_says_postfix_keeps_to_data():
    chunked = bench.Options(chunking=True)
    assert chunked.names() == ["chunking"]
    assert bench.relay_overrides(chunked, FILES, SINKS_CA) == {"shaping": {"default": {"chunking": True}}}
    both = bench.relay_overrides(bench.Options(tls=True, chunking=True), FILES, SINKS_CA)
    assert both["deliver"] == {"tls": "verify", "ca_file": SINKS_CA} and "shaping" in both
    described = bench.describe(chunked, postfix=True)
    assert described["chunking"] is True and "BDAT" in described["relay"]["chunking"]
    assert described["postfix"]["chunking"].startswith("DATA")
    assert "CHUNKING" in bench.summary(described)
