"""Fuzz: the DATA reader (intake.data.DataReader) fed as RelaySMTP feeds it."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

import targets

_pieces = st.sampled_from([
    b"a", b"Subject: x", b".", b"..", b"\r", b"\n", b"\r\n", b"\r\n.", b"\n.\n", b"\r.\r",
    b"\r\n.\n", b"\0", b"Received: x\r\n", b"received:y\r\n", b"\r\n\r\n", b" ", b"\t",
    b"\xff\xfe", b"x" * 500, b"y" * 997, b"z" * 1001, b".\r\n",
])
bodies = st.one_of(
    st.lists(st.one_of(_pieces, st.binary(max_size=20)), max_size=40).map(b"".join),
    st.binary(max_size=300),
)


@targets.fuzz_settings(300)
@given(
    data=bodies,
    normalize=st.booleans(),
    max_size=st.sampled_from([1024, 1500, 10**6]),
    cuts=st.lists(st.integers(0, 3000), max_size=10),
)
def test_data_reader_properties(data, normalize, max_size, cuts):
    targets.check_data(data, normalize=normalize, max_size=max_size, cuts=cuts)


@targets.fuzz_settings(150)
@given(data=st.binary(max_size=400))
def test_data_reader_raw_bytes(data):
    targets.run_data(data)
