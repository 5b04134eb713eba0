"""relayctl hash-password: make a password_hash for [[intake.users]]."""

from __future__ import annotations

import getpass
import sys

from relay.intake.auth import hash_password


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("hash-password", help="hash a password for [[intake.users]]")
    parser.add_argument("--stdin", action="store_true", help="read the password from stdin")
    parser.set_defaults(run=run)


def run(args) -> int:
    if args.stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            print("relayctl: the passwords differ", file=sys.stderr)
            return 1
    if not password:
        print("relayctl: empty password", file=sys.stderr)
        return 1
    print(hash_password(password))
    return 0
