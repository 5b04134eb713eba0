"""Enough TOML to write relay configurations, for the tests and the perf
harness (tomllib reads TOML; nothing in the standard library writes it)."""

from __future__ import annotations


def _value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    raise TypeError(value)


def _key(key: str) -> str:
    return key if key.replace("_", "").isalnum() else _value(key)


def toml_dumps(doc: dict) -> str:
    """Tables (also nested, like [amqp.events]), arrays of tables (also
    nested, like [[intake.users]]), scalars, lists."""
    out = []
    for section, body in doc.items():
        if isinstance(body, list):
            for item in body:
                out.append(f"[[{section}]]")
                out += [f"{_key(k)} = {_value(v)}" for k, v in item.items()]
            continue
        out.append(f"[{section}]")
        nested = {k: v for k, v in body.items() if isinstance(v, list) and v and isinstance(v[0], dict)}
        tables = {k: v for k, v in body.items() if isinstance(v, dict)}
        out += [f"{_key(k)} = {_value(v)}" for k, v in body.items()
                if k not in nested and k not in tables]
        for name, table in tables.items():  # like [amqp.events]
            out.append(f"[{section}.{name}]")
            out += [f"{_key(k)} = {_value(v)}" for k, v in table.items()]
        for name, items in nested.items():
            for item in items:
                out.append(f"[[{section}.{name}]]")
                out += [f"{_key(k)} = {_value(v)}" for k, v in item.items()]
    return "\n".join(out) + "\n"
