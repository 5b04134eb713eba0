"""relayctl: the operator's command line (one verb, one job).

``main(argv)`` parses and dispatches; each verb module exposes
``add_parser(subparsers)`` and ``run(args) -> exit status``.  ``-c FILE``
and ``--json`` belong to every verb and may come before or after it.
Errors are one line on stderr and exit status 1 (2 for a bad
configuration).
"""

from __future__ import annotations

import argparse
import sys

from relay.cli import (admin, amqp, campaign, cluster, config_cmd, msg, password, queue, shaping,
                       spool_cmd, stats, token)


def _verbs():
    verbs = [stats, queue, msg, admin, shaping, campaign, config_cmd, password, spool_cmd, token,
             amqp, cluster]
    try:
        from relay.cli import dkim
    except ImportError:  # the DKIM verbs are optional until their module lands
        pass
    else:
        verbs.append(dkim)
    return verbs


def _common_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    parser.add_argument("-c", "--config",
                        default=argparse.SUPPRESS if suppress else "conf/relay.toml",
                        help="TOML configuration file (default conf/relay.toml)")
    parser.add_argument("--json", action="store_true",
                        default=argparse.SUPPRESS if suppress else False,
                        help="machine-readable output")


class _Verbs:
    """The subparsers action, handing every verb the common options.  Their
    default is SUPPRESS there, so an option given before the verb is not
    overwritten by the verb's parser when it is not repeated after it."""

    def __init__(self, action, common: argparse.ArgumentParser) -> None:
        self._action, self._common = action, common

    def add_parser(self, name: str, **kwargs) -> argparse.ArgumentParser:
        return self._action.add_parser(name, parents=[self._common], **kwargs)

    def add_subverbs(self, parser: argparse.ArgumentParser, **kwargs) -> "_Verbs":
        """Subcommands of a verb (``dkim keygen``), with the common options too."""
        return _Verbs(parser.add_subparsers(**kwargs), self._common)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="relayctl", description="Inspect and steer the relay.")
    _common_options(parser, suppress=False)
    common = argparse.ArgumentParser(add_help=False)
    _common_options(common, suppress=True)
    subparsers = _Verbs(parser.add_subparsers(dest="verb", required=True, metavar="VERB"), common)
    for verb in _verbs():
        verb.add_parser(subparsers)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
