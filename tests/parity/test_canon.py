"""relay._fast.canon against relay._ref.canon, and relay.accel's choice between them.

The ``impl`` fixture runs each RFC case on both implementations; the
differential tests compare them on random header fields, valid or not (bare
CR and LF, folds, 8-bit bytes), since both must define every input the same.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


TWIN = "canon"  # the impl and both fixtures (conftest.py)


# -- the RFC's rules, on both implementations --------------------------------

RELAXED = [
    # (name, value, canonical) -- RFC 6376 section 3.4.2
    (b"SUBJect", b" AbC", b"subject:AbC"),  # the RFC's own example
    (b"A", b" X", b"a:X"),  # 3.4.5
    (b"B ", b" Y\t\r\n\tZ  ", b"b:Y Z"),  # 3.4.5: WSP before the colon, a fold
    (b"To", b" a@b.example,\r\n  c@d.example", b"to:a@b.example, c@d.example"),
    (b"X", b"", b"x:"),
    (b"X", b" \t ", b"x:"),
    (b"X", b"a \r\n \r\n b", b"x:a b"),  # two folds in a row
    (b"X", b"a\r\nb", b"x:a\r\nb"),  # not a fold (no WSP after): kept
    (b"X", b"a\rb\nc", b"x:a\rb\nc"),  # bare CR / LF are not WSP
    (b"X", b"\r\n\r\n ", b"x:\r\n"),  # unfolding is one pass over the original
    (b"X-\xc3\x89", b" caf\xc3\xa9  \xff", b"x-\xc3\x89:caf\xc3\xa9 \xff"),  # only ASCII is lowered
    (b"H", b"a" * 5000, b"h:" + b"a" * 5000),  # longer than _fast's stack buffer
]


@pytest.mark.parametrize("name,value,canonical", RELAXED)
def test_relaxed(impl, name, value, canonical):
    assert impl.canon_header_relaxed(name, value) == canonical


@pytest.mark.parametrize("name,value", [(b"B ", b" Y\t\r\n\tZ  "), (b"Subject", b"")])
def test_simple_is_the_field_as_it_appears(impl, name, value):
    assert impl.canon_header_simple(name, value) == name + b":" + value


def test_rejects_text(impl):
    for call in (impl.canon_header_relaxed, impl.canon_header_simple):
        with pytest.raises(TypeError):
            call("Subject", " text")
        with pytest.raises(TypeError):
            call(None, b"x")


# -- differential: _fast == _ref ---------------------------------------------

_NAMES = st.lists(
    st.one_of(st.sampled_from([b"a", b"Z", b"-", b" ", b"\t", b"\xc3\x89", b"\x80"]), st.binary(max_size=3)),
    max_size=8,
).map(b"".join)
_VALUES = st.one_of(
    st.lists(
        st.one_of(
            st.sampled_from(
                [b" ", b"  ", b"\t", b"\r\n ", b"\r\n\t", b"\r\n", b"\r", b"\n", b"\r\n\r\n "]
            ),
            st.binary(min_size=1, max_size=12),
            st.sampled_from([b"\xc3\xa9", b"\xff", b"word"]),
        ),
        max_size=30,
    ).map(b"".join),
    st.binary(max_size=200),
)


@settings(max_examples=300, deadline=None)
@given(name=_NAMES, value=_VALUES)
def test_fast_equals_ref(both, name, value):
    ref, fast = both
    assert fast.canon_header_relaxed(name, value) == ref.canon_header_relaxed(name, value)
    assert fast.canon_header_simple(name, value) == ref.canon_header_simple(name, value)


# -- relay.accel -------------------------------------------------------------


def test_fast_really_loaded():
    """CI and deploys set RELAY_REQUIRE_EXTENSIONS=1: then _fast must be in use.

    (yarl's test_quoting_c_loaded.)
    """
    if os.environ.get("RELAY_REQUIRE_EXTENSIONS") != "1":
        pytest.skip("RELAY_REQUIRE_EXTENSIONS=1 is not set")
    if os.environ.get("RELAY_NO_EXTENSIONS") == "1":
        pytest.skip("RELAY_NO_EXTENSIONS=1 asks for _ref")
    from relay import accel

    assert accel.IMPLEMENTATION == "fast"
    assert accel.canon_header_relaxed is importlib.import_module("relay._fast.canon").canon_header_relaxed
    assert accel.BodyHasher is importlib.import_module("relay._fast.bodyhash").BodyHasher
    datalines = importlib.import_module("relay._fast.datalines")
    assert accel.unstuff_clean is datalines.unstuff_clean
    assert accel.whole_lines is datalines.whole_lines and accel.dot_stuffed is datalines.dot_stuffed


def _accel_in_subprocess(env: dict[str, str], block_fast: bool = False) -> subprocess.CompletedProcess:
    """Import relay.accel in a fresh interpreter; optionally make relay._fast unimportable."""
    code = textwrap.dedent(
        """
        import logging, sys
        logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(levelname)s %(message)s")
        if BLOCK:
            class Block:
                def find_spec(self, name, path=None, target=None):
                    if name.startswith("relay._fast."):
                        raise ImportError("blocked for the test")
            sys.meta_path.insert(0, Block())
        from relay import accel
        print("IMPLEMENTATION", accel.IMPLEMENTATION, accel.BodyHasher.__module__)
        """
    ).replace("BLOCK", str(block_fast))
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    clean["PYTHONPATH"] = ROOT + os.pathsep + clean.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-c", code],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_accel_no_extensions_picks_ref():
    done = _accel_in_subprocess({"RELAY_NO_EXTENSIONS": "1", "RELAY_REQUIRE_EXTENSIONS": "1"})
    assert done.returncode == 0, done.stderr
    assert "IMPLEMENTATION ref relay._ref.bodyhash" in done.stdout
    assert done.stdout.count("hot paths:") == 1  # logged once


def test_accel_falls_back_with_a_warning():
    done = _accel_in_subprocess({}, block_fast=True)
    assert done.returncode == 0, done.stderr
    assert "IMPLEMENTATION ref relay._ref.bodyhash" in done.stdout
    assert "WARNING relay._fast.canon unavailable" in done.stdout


def test_accel_missing_extension_is_fatal_when_required():
    done = _accel_in_subprocess({"RELAY_REQUIRE_EXTENSIONS": "1"}, block_fast=True)
    assert done.returncode != 0
    assert "ImportError" in done.stderr and "RELAY_REQUIRE_EXTENSIONS=1" in done.stderr
