"""perf.ceiling: the C-pair's traffic and command for a scenario, and the fractions (pure)."""

from __future__ import annotations

from perf import ceiling, scenarios

TOOLS = ("/usr/sbin/smtp-source", "/usr/sbin/smtp-sink")


def test_hot_domain_shape():
    assert ceiling.shape(scenarios.build("hot-domain", quick=True)) == ceiling.Shape(
        messages=1_000, size=10 * 1024, recipients=1, sessions=50)


def test_bulk_shape_keeps_its_recipients_per_message():
    pair = ceiling.shape(scenarios.build("bulk", quick=False))
    assert (pair.messages, pair.size, pair.recipients, pair.sessions) == (1_000, 20 * 1024, 100, 10)


def test_mixed_streams_are_averaged_by_messages_and_connections_add_up():
    pair = ceiling.shape(scenarios.build("mixed", quick=True))
    # 50 bulk messages (20 KB, 100 rcpts, 10 connections) + 50 probes (2 KB, 1 rcpt, 4)
    assert pair == ceiling.Shape(messages=100, size=11 * 1024, recipients=50, sessions=14)


def test_commands():
    pair = ceiling.Shape(messages=1_000, size=10_240, recipients=1, sessions=50)
    source, sink = ceiling.commands(TOOLS, pair, 2525, root=True)
    assert source == [TOOLS[0], "-s", "50", "-m", "1000", "-l", "10240", "-r", "1", "-d",
                      "-f", "bench@sender.example", "-t", "ceiling@d0000.example",
                      "-M", "loadgen.test", "127.0.0.1:2525"]
    assert sink == [TOOLS[1], "-u", "nobody", "-m", "256", "127.0.0.1:2525", "1024"]
    _, as_user = ceiling.commands(TOOLS, pair, 2525, root=False)
    assert "-u" not in as_user


def test_describe_names_the_programs_not_their_paths():
    found = ceiling.describe(TOOLS, ceiling.Shape(1_000, 10_240, 1, 50))
    assert found["source_command"].startswith("smtp-source -s 50 -m 1000 -l 10240 ")
    assert found["source_command"].endswith(" 127.0.0.1:PORT")
    assert found["sink_command"].startswith("smtp-sink ")
    assert "/" not in found["source_command"].split()[0]


def test_fractions():
    medians = {"relay": {"delivered_per_s": 900.0}, "postfix": {"delivered_per_s": 450.0},
               "broken": {"delivered_per_s": None}}
    assert ceiling.fractions(medians, {"delivered_per_s": 9_000.0}) == {
        "relay": 0.1, "postfix": 0.05, "broken": None}
    assert ceiling.fractions(medians, {"delivered_per_s": 0})["relay"] is None
