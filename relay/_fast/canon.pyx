"""DKIM header canonicalization (RFC 6376 section 3.4), in C.

Input: ``name`` as it appears and ``value`` (everything after the colon,
folds included, final CRLF excluded).  Output: ``name:value`` without a
trailing CRLF.  The specification, with the reasons, is relay/_ref/canon.py;
this module must return the same bytes for every input (tests/parity).

One pass over the value into a C buffer sized for the worst case (nothing
removed), then one bytes object: no per-byte Python objects.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Malloc

# Most header fields are short: canonicalize those on the stack.
cdef enum:
    STACK_BUFFER = 1024


cdef inline bint _is_wsp(unsigned char c) nogil:
    return c == 0x20 or c == 0x09


cdef inline int _check(bytes name, bytes value) except -1:
    # cpdef arguments cannot say "not None"; the _ref twin raises TypeError too.
    if name is None or value is None:
        raise TypeError("name and value must be bytes")
    return 0


cpdef bytes canon_header_simple(bytes name, bytes value):
    """RFC 6376 section 3.4.1: the field exactly as it appears."""
    _check(name, value)
    return name + b":" + value


cpdef bytes canon_header_relaxed(bytes name, bytes value):
    """RFC 6376 section 3.4.2 (see relay/_ref/canon.py for the steps)."""
    _check(name, value)
    cdef const unsigned char *n = <const unsigned char *>PyBytes_AS_STRING(name)
    cdef const unsigned char *v = <const unsigned char *>PyBytes_AS_STRING(value)
    cdef Py_ssize_t nlen = PyBytes_GET_SIZE(name)
    cdef Py_ssize_t vlen = PyBytes_GET_SIZE(value)
    cdef unsigned char stack[STACK_BUFFER]
    cdef unsigned char *out = stack
    cdef Py_ssize_t o

    if nlen + 1 + vlen > STACK_BUFFER:
        out = <unsigned char *>PyMem_Malloc(nlen + 1 + vlen)
        if out == NULL:
            raise MemoryError()
    try:
        o = _relaxed_into(n, nlen, v, vlen, out)
        return PyBytes_FromStringAndSize(<char *>out, o)
    finally:
        if out != stack:
            PyMem_Free(out)


cdef Py_ssize_t _relaxed_into(const unsigned char *n, Py_ssize_t nlen,
                              const unsigned char *v, Py_ssize_t vlen,
                              unsigned char *out) noexcept nogil:
    cdef Py_ssize_t i, start, o = 0
    cdef unsigned char c
    cdef bint pending_sp = False

    # Name: lower-case ASCII, drop WSP before the colon.
    while nlen > 0 and _is_wsp(n[nlen - 1]):
        nlen -= 1
    for i in range(nlen):
        c = n[i]
        if 0x41 <= c <= 0x5A:
            c += 0x20
        out[o] = c
        o += 1
    out[o] = 0x3A  # ':'
    o += 1
    start = o

    # Value: unfold, one SP per WSP run, no WSP at either end.  A WSP run is
    # held in pending_sp and written only when content follows, which drops
    # leading and trailing WSP for free.
    i = 0
    while i < vlen:
        c = v[i]
        if c == 0x0D and i + 2 < vlen and v[i + 1] == 0x0A and _is_wsp(v[i + 2]):
            i += 2  # a fold: the WSP after it is handled as WSP
            continue
        if _is_wsp(c):
            if o > start:  # WSP right after the colon is dropped
                pending_sp = True
        else:
            if pending_sp:
                out[o] = 0x20
                o += 1
                pending_sp = False
            out[o] = c
            o += 1
        i += 1
    return o
