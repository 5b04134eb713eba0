"""The fixtures every parity test uses: its module's ``TWIN`` (the name
shared by relay/_fast/TWIN.pyx and relay/_ref/TWIN.py) in each build."""

from __future__ import annotations

import pytest

from support import implementation


@pytest.fixture(params=["_ref", "_fast"])
def impl(request):
    """The twin in one build, each test running once per build."""
    return implementation(request.param, request.module.TWIN)


@pytest.fixture(scope="module")
def both(request):
    """(the _ref twin, the _fast one), for differential tests."""
    return implementation("_ref", request.module.TWIN), implementation("_fast", request.module.TWIN)
