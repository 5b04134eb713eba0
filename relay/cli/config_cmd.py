"""relayctl config [--defaults | --changed] [--json]: the settings as TOML
that can be pasted back into the config file (postconf -d / -n).

Input: the config file (``-c``; not read for ``--defaults``).  Output: every
table — ``[relay]``, ``[[listen]]``, ``[tls]``, ``[intake]`` with
``[[intake.users]]``, ``[dns]``, ``[deliver]``, ``[routes]``,
``[tls_policy]``, ``[stats]``, ``[[dkim]]`` — with values in their file
form: durations ``"5m"``, sizes ``"25M"``, addresses ``"host:port"``.
Paths are shown as the relay uses them: resolved against the config
file's directory (``--defaults``: as declared, relative to it).
``--defaults`` adds commented templates for the tables that are absent by
default; ``--changed`` shows only what differs from the defaults.
``--json`` prints the same document as one JSON object.  Exit status 0;
2 for a bad configuration.
"""

from __future__ import annotations

import os
import sys

import orjson
import tomli_w

from relay import config
from relay.errors import ConfigError


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("config", help="show the configuration as TOML")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--defaults", action="store_true", help="every key with its default")
    which.add_argument("--changed", action="store_true", help="only keys that differ from defaults")
    parser.set_defaults(run=run)


def run(args) -> int:
    if args.defaults:
        doc = config.to_document(config.defaults())
    else:
        try:
            current = config.load(args.config)
        except ConfigError as exc:
            print(f"relayctl: {exc}", file=sys.stderr)
            return 2
        if args.changed:
            # Defaults with their paths resolved as the file's are, so an
            # unset path does not count as changed.
            base = config.from_dict({}, base_dir=os.path.dirname(os.path.abspath(args.config)))
            doc = config.changed_document(current, base)
        else:
            doc = config.to_document(current)
    if args.json:
        print(orjson.dumps(doc).decode())
        return 0
    text = tomli_w.dumps(doc)
    if args.defaults:
        text = ("# relay defaults; relative paths are taken from the config file's directory\n\n"
                + text + templates())
    sys.stdout.write(text)
    return 0


def templates() -> str:
    """The optional tables as comments: uncommented, they are valid TOML."""
    out = []
    for header, keys, meaning in config.OPTIONAL_TABLES:
        out += ["", f"# {header}  ({meaning})"]
        for name, key in keys.items():
            if key.default is None:
                value = '"..."'  # required in each entry
            else:
                written = tomli_w.dumps({name: config.file_value(key, key.default)})
                value = " ".join(written.split(" = ", 1)[1].split())  # arrays on one line
            out.append(f"# {name} = {value}  # {key.doc}")
    return "\n".join(out) + "\n"
