"""relayctl config [--defaults | --changed] [--json]: show settings (postconf -d / -n)."""

from __future__ import annotations

import sys

import orjson

from relay import config
from relay.errors import ConfigError


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("config", help="show the configuration")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--defaults", action="store_true", help="every key with its default")
    which.add_argument("--changed", action="store_true", help="only keys that differ from defaults")
    parser.set_defaults(run=run)


def _show(value) -> str:
    if isinstance(value, tuple):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if isinstance(value, str):
        return f'"{value}"'
    return str(value).lower() if isinstance(value, bool) else str(value)


def run(args) -> int:
    defaults = config.flatten(config.defaults())
    if args.defaults:
        shown = defaults
    else:
        try:
            current = config.flatten(config.load(args.config))
        except ConfigError as exc:
            print(f"relayctl: {exc}", file=sys.stderr)
            return 2
        shown = {k: v for k, v in current.items() if not args.changed or v != defaults[k]}
    if args.json:
        print(orjson.dumps({k: _show(v) if not isinstance(v, (int, float, bool)) else v
                            for k, v in shown.items()}).decode())
    else:
        for key, value in shown.items():
            print(f"{key} = {_show(value)}")
    return 0
