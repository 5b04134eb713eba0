"""The relay's runtime dependencies: what it needs, pinned where it must be.

aiosmtplib and dkimpy serve the tests and perf/ only (the ``test`` extra):
every module of the relay, relay.testing included, must import without
them.  aiosmtpd is pinned to the release line the intake was tested with,
and the installed copy must be inside that range.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys

from packaging.requirements import Requirement

from support import ROOT

TEST_ONLY = {"aiosmtplib": "aiosmtplib", "dkimpy": "dkim"}  # distribution -> module


def _requirements(extra: str | None) -> dict[str, Requirement]:
    """The installed relay's requirements: runtime ones, or those of an extra."""
    found = {}
    for text in importlib.metadata.requires("relay") or ():
        requirement = Requirement(text)
        if extra is None:
            wanted = requirement.marker is None
        else:
            wanted = requirement.marker is not None and requirement.marker.evaluate({"extra": extra})
        if wanted:
            found[requirement.name.lower()] = requirement
    return found


def test_test_only_packages_are_not_runtime_requirements():
    runtime = _requirements(None)
    test = _requirements("test")
    for distribution in TEST_ONLY:
        assert distribution not in runtime
        assert distribution in test


def test_every_relay_module_imports_without_the_test_only_packages():
    # A None entry in sys.modules makes `import dkim` raise ImportError.
    blocked = ", ".join(repr(module) for module in TEST_ONLY.values())
    script = f"""
import pkgutil, sys
for name in ({blocked},):
    sys.modules[name] = None
import relay
names = [m.name for m in pkgutil.walk_packages(relay.__path__, "relay.")
         if not m.name.endswith(".__main__")]  # runs the command line
for name in names:
    __import__(name)
print(len(names))
"""
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert int(result.stdout.split()[-1]) > 30  # the walk found the package's modules


def test_installed_aiosmtpd_is_inside_the_pinned_range():
    requirement = _requirements(None)["aiosmtpd"]
    specifiers = list(requirement.specifier)
    assert any(s.operator == "<" for s in specifiers), "aiosmtpd needs an upper bound"
    assert requirement.specifier.contains(importlib.metadata.version("aiosmtpd"))
