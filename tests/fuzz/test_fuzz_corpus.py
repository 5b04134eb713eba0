"""Fuzz: the checked-in corpus (tests/fuzz/corpus/<target>/) replayed through
every target's ``run``.  Seeds are hand-written; inputs the long runs found
interesting or that once failed are added here, so they stay covered."""

from __future__ import annotations

import os

import pytest

import targets

CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")
FILES = sorted(
    (target, name) for target in targets.TARGETS for name in os.listdir(os.path.join(CORPUS, target))
)


def test_every_target_has_a_corpus():
    for target in targets.TARGETS:
        assert len(os.listdir(os.path.join(CORPUS, target))) >= 5, target


@pytest.mark.parametrize("target, name", FILES, ids=[f"{t}/{n}" for t, n in FILES])
def test_corpus_file(target, name):
    with open(os.path.join(CORPUS, target, name), "rb") as file:
        targets.TARGETS[target](file.read())
