"""Picks the implementation of the per-byte hot paths: relay/_fast (Cython) or relay/_ref (Python).

Input: the environment, read once at import.
  RELAY_NO_EXTENSIONS=1       use _ref (also on any interpreter but CPython)
  RELAY_REQUIRE_EXTENSIONS=1  a missing or broken _fast is fatal (CI, deploys);
                              it does not override RELAY_NO_EXTENSIONS
Output: ``IMPLEMENTATION`` ("fast" or "ref") and the chosen names:
``canon_header_relaxed``, ``canon_header_simple``, ``BodyHasher``,
``unstuff_clean``, ``whole_lines``, ``dot_stuffed``.

The choice is made per module, so a build that lacks one extension still
uses the others; ``IMPLEMENTATION`` is "fast" only when every module is.
Without RELAY_REQUIRE_EXTENSIONS a missing extension falls back to _ref with
a warning: a developer's checkout without a build still works, but never
silently (the choice is logged once, and `relayctl stats` shows it).
"""

from __future__ import annotations

import importlib
import logging
import os
import platform

__all__ = [
    "IMPLEMENTATION",
    "MODULES",
    "BodyHasher",
    "canon_header_relaxed",
    "canon_header_simple",
    "dot_stuffed",
    "unstuff_clean",
    "whole_lines",
]

log = logging.getLogger("relay.accel")


def _flag(name: str) -> bool:
    return os.environ.get(name, "") == "1"


def _load(name: str, *, use_fast: bool, require: bool):
    """(module, "fast" | "ref") for relay._fast.<name> or its _ref twin."""
    if use_fast:
        try:
            return importlib.import_module(f"relay._fast.{name}"), "fast"
        except ImportError as exc:
            if require:
                raise ImportError(
                    f"relay._fast.{name} is required (RELAY_REQUIRE_EXTENSIONS=1) but cannot"
                    f" be imported: {exc}; build it with `python setup.py build_ext --inplace`"
                ) from exc
            log.warning(
                "relay._fast.%s unavailable (%s): using the pure-Python relay._ref.%s",
                name,
                exc,
                name,
            )
    return importlib.import_module(f"relay._ref.{name}"), "ref"


# The modules with a _fast build and a _ref twin.
_NAMES = ("canon", "bodyhash", "datalines")


def _choose() -> tuple[dict[str, str], str, dict[str, object]]:
    require = _flag("RELAY_REQUIRE_EXTENSIONS")
    if _flag("RELAY_NO_EXTENSIONS"):
        use_fast, reason = False, "RELAY_NO_EXTENSIONS=1"
    elif platform.python_implementation() != "CPython":
        use_fast, reason = False, platform.python_implementation()
    else:
        use_fast, reason = True, ""
    # Disabling is an explicit choice, so it wins over RELAY_REQUIRE_EXTENSIONS
    # (which guards against a *missing* build, not against asking for _ref).
    loaded = {name: _load(name, use_fast=use_fast, require=require) for name in _NAMES}
    modules = {name: impl for name, (_module, impl) in loaded.items()}
    return modules, reason, {name: module for name, (module, _impl) in loaded.items()}


MODULES, _reason, _chosen = _choose()
IMPLEMENTATION = "fast" if all(impl == "fast" for impl in MODULES.values()) else "ref"

canon_header_relaxed = _chosen["canon"].canon_header_relaxed
canon_header_simple = _chosen["canon"].canon_header_simple
BodyHasher = _chosen["bodyhash"].BodyHasher
unstuff_clean = _chosen["datalines"].unstuff_clean
whole_lines = _chosen["datalines"].whole_lines
dot_stuffed = _chosen["datalines"].dot_stuffed

log.info(
    "hot paths: %s (%s)%s",
    IMPLEMENTATION,
    ", ".join(f"{name}={impl}" for name, impl in MODULES.items()),
    f"; extensions disabled by {_reason}" if _reason else "",
)
