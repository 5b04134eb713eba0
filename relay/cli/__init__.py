"""relayctl: the operator's command line (one verb, one job).

``main(argv)`` parses and dispatches; each verb module exposes
``add_parser(subparsers)`` and ``run(args) -> exit status``.  Errors are
one line on stderr and exit status 1 (2 for a bad configuration).
"""

from __future__ import annotations

import argparse
import sys

from relay.cli import admin, amqp, config_cmd, msg, password, queue, stats


def _verbs():
    verbs = [stats, queue, msg, admin, config_cmd, password, amqp]
    try:
        from relay.cli import dkim
    except ImportError:  # the DKIM verbs are optional until their module lands
        pass
    else:
        verbs.append(dkim)
    return verbs


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="relayctl", description="Inspect and steer the relay.")
    parser.add_argument("-c", "--config", default="conf/relay.toml", help="TOML configuration file")
    subparsers = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for verb in _verbs():
        verb.add_parser(subparsers)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
