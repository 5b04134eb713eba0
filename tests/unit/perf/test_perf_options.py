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


def test_postfix_signs_through_the_milters_it_is_given():
    main_cf = bench.postfix_main_cf(bench.Options(dkim=True), FILES, SINKS_CA, (10025, 10026))
    assert main_cf == {"smtpd_milters": "inet:127.0.0.1:10025, inet:127.0.0.1:10026",
                       "milter_default_action": "tempfail", "milter_protocol": "6"}
    assert bench.postfix_main_cf(bench.Options(), FILES, SINKS_CA, (10025,)) == {}  # no --dkim
    both = bench.postfix_main_cf(bench.Options(dkim=True, tls=True), FILES, SINKS_CA, (10025,))
    assert both["smtpd_milters"] == "inet:127.0.0.1:10025" and both["smtp_tls_security_level"] == "verify"


def test_each_opendkim_signs_with_one_key_of_the_sender_domain():
    conf = bench.opendkim_files("ed25519-sha256", "bench-ed25519", "/run/ed.pem", "/run/odk", 10025)
    assert list(conf) == ["opendkim.conf"]
    lines = dict(line.split(" ", 1) for line in conf["opendkim.conf"].splitlines())
    assert lines["Mode"] == "s"
    assert lines["Socket"] == "inet:10025@127.0.0.1"
    assert (lines["Domain"], lines["Selector"], lines["KeyFile"]) == ("sender.example", "bench-ed25519",
                                                                      "/run/ed.pem")
    assert lines["SignatureAlgorithm"] == "ed25519-sha256"
    assert lines["Canonicalization"] == "relaxed/relaxed" and lines["OversignHeaders"] == "From"
    assert lines["InternalHosts"] == "127.0.0.0/8"  # the generator's sources
    assert lines["PidFile"] == "/run/odk/opendkim.pid"


def test_describe_says_how_postfix_signs_when_opendkim_is_there(monkeypatch):
    monkeypatch.setattr(bench, "opendkim_path", lambda: "/usr/sbin/opendkim")
    signs, how = bench.postfix_signs()
    assert signs and "OpenDKIM" in how
    described = bench.describe(bench.Options(dkim=True), postfix=True)
    assert described["postfix"]["dkim"] == how
    assert f"Postfix {how}" in bench.summary(described)
    monkeypatch.setattr(bench, "opendkim_path", lambda: None)
    signs, why = bench.postfix_signs()
    assert not signs and why.startswith("unsigned") and "apt-get install opendkim" in why


def test_signatures_are_counted_in_the_header_only():
    message = (b"dkim-signature: v=1; a=rsa-sha256\r\nDKIM-Signature: v=1\r\n\tb=x\r\n"
               b"From: a@sender.example\r\n\r\nDKIM-Signature: in the body\r\n")
    assert bench.count_signatures(message) == 2
    assert bench.count_signatures(b"From: a@b\r\n\r\nbody\r\n") == 0
    assert bench.count_signatures(b"X-DKIM-Signature: no\r\n\r\n") == 0
    assert bench.count_signatures(b"DKIM-Signature: v=1\r\n") == 1  # all header, no body


def test_a_signed_sample_is_verified_against_the_runs_keys(tmp_path):
    from relay.dkim import Signer

    files = bench.make_files(str(tmp_path), bench.Options(dkim=True))
    assert [a for a, _, _ in files.dkim_keys] == ["ed25519-sha256", "rsa-sha256"]
    signer = Signer.from_identities(_identities(files))
    message = (b"From: bench@sender.example\r\nTo: r@d0000.example\r\nSubject: s\r\n"
               b"Date: Wed, 02 Dec 2026 10:00:00 +0000\r\nMessage-ID: <1@sender.example>\r\n"
               b"\r\nbody\r\n")
    signed = signer.sign(message, "bench@sender.example") + message
    assert bench.count_signatures(signed) == 2
    assert bench.verify_sample(signed, files) == [True, True]
    assert bench.verify_sample(signed.replace(b"body", b"bodY"), files) == [False, False]
    assert bench.verify_sample(message, files) == []


def _identities(files):
    from relay.config import DkimIdentity

    return [DkimIdentity(domain=bench.DKIM_DOMAIN, selector=selector, key_file=path, algorithm=algorithm)
            for algorithm, selector, path in files.dkim_keys]


def test_a_malformed_signature_fails_the_check_instead_of_the_run(tmp_path):
    from relay.dkim import Signer

    files = bench.make_files(str(tmp_path), bench.Options(dkim=True))
    message = b"From: bench@sender.example\r\nSubject: s\r\n\r\nbody\r\n"
    signed = Signer.from_identities(_identities(files)).sign(message, "") + message
    broken = signed.replace(b"b=", b"b=!!not base64!!", 1)
    assert bench.verify_sample(broken, files) == [False, True]


def test_the_dkim_line_flags_a_missing_signature_and_an_unchecked_side():
    from perf.bench import dkim_lines

    run = {"outbound_transactions": 10, "outbound_signed_transactions": 10, "outbound_dkim_signatures": 20}
    lines = dkim_lines({"relay": [{**run, "dkim_sample_verified": [True, True]}],
                        "postfix": [{**run, "dkim_sample_verified": [True]}],
                        "amqp": [{**run, "dkim_sample_verified": None}],
                        "plain": [{"outbound_transactions": 10, "dkim_sample_verified": None}]})
    assert lines[0] == ("relay: 10 of 10 transactions signed, 20 signatures;"
                        " first signed message of each run: ok (2 of 2)")
    assert lines[1].endswith("1 of 2 signatures verified")
    assert lines[2].endswith("not checked") and lines[3].endswith("none signed")
