"""relayctl token create: a bearer token for the HTTP API.

``relayctl token create --name NAME --scopes inject,admin [--json]``
prints the token (shown once: only its hash is kept) and the
``[[http.tokens]]`` entry to paste into the configuration; with ``--json``
one object ``{"name", "scopes", "token", "token_hash"}``.
"""

from __future__ import annotations

import sys

import orjson

from relay.config import TOKEN_SCOPES
from relay.intake.http.tokens import hash_token, new_token


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("token", help="make a bearer token for the HTTP API")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = actions.add_parser("create", help="print a new token and its [[http.tokens]] entry")
    create.add_argument("--name", required=True, help="who the token is for")
    create.add_argument("--scopes", required=True,
                        help="comma-separated: " + ", ".join(TOKEN_SCOPES))
    create.add_argument("--json", action="store_true", help="machine-readable output")
    create.set_defaults(run=run)


def run(args) -> int:
    scopes = [s.strip() for s in args.scopes.split(",") if s.strip()]
    unknown = [s for s in scopes if s not in TOKEN_SCOPES]
    if not scopes or unknown:
        print(f"relayctl: --scopes takes {', '.join(TOKEN_SCOPES)}; got {args.scopes!r}",
              file=sys.stderr)
        return 1
    if not args.name.strip():
        print("relayctl: --name must not be empty", file=sys.stderr)
        return 1
    token = new_token()
    token_hash = hash_token(token)
    if args.json:
        print(orjson.dumps({"name": args.name, "scopes": scopes, "token": token,
                            "token_hash": token_hash}).decode())
        return 0
    print(f"token (shown once, keep it secret): {token}")
    print()
    print("[[http.tokens]]")
    print(f"name = {orjson.dumps(args.name).decode()}")
    print(f'token_hash = "{token_hash}"')
    print("scopes = [" + ", ".join(f'"{s}"' for s in scopes) + "]")
    return 0
