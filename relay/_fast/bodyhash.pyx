"""DKIM body canonicalization and body hash (RFC 6376 sections 3.4.3-3.4.4), in C.

Input: the body in chunks split anywhere (bytes, bytearray or a contiguous
memoryview, so a signer can pass a slice of the message without copying).
Output: ``digest()``, the raw body hash, and ``length``, the canonical bytes
hashed (``l=``).  The specification, its theory of operation and the
held-back state (``_crlfs``, ``_sp``, ``_cr``) are in relay/_ref/bodyhash.py;
this module must agree with it byte for byte, ``length`` included, after
every chunk (tests/parity).

How it is fast: one pass per chunk over a C pointer, canonical bytes
written into a 64 KiB buffer that goes to hashlib in one call when full or
at ``digest()`` (so many small chunks do not mean many hash calls).  With
"simple" the canonical body is the input less a held-back tail, so long
stretches go to the hash straight from the caller's buffer, with no copy.
"""

cimport cython
from cpython.buffer cimport PyBUF_READ, PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.memoryview cimport PyMemoryView_FromMemory
from cpython.pyport cimport PY_SSIZE_T_MAX
from libc.stdint cimport uint64_t
from libc.string cimport memcpy

import hashlib

cdef enum:
    OUT_SIZE = 65536    # canonical bytes gathered before one hash update
    DIRECT_MIN = 2048   # "simple": content this long is hashed in place

cdef enum:
    CR = 0x0D
    LF = 0x0A
    SP = 0x20
    HTAB = 0x09

_CONSTRUCTORS = {"sha256": hashlib.sha256, "sha1": hashlib.sha1}
_CANONICALIZATIONS = ("simple", "relaxed")

cdef const unsigned char *CRLF = b"\r\n"

# Bytes that end a run of plain content in "relaxed": WSP, and CR (which may
# start a CRLF).
cdef bint _SPECIAL[256]
for _c in range(256):
    _SPECIAL[_c] = _c in (SP, HTAB, CR)


cdef inline uint64_t _bytes_equal(uint64_t word, uint64_t pattern) noexcept nogil:
    """0x80 in each byte of word equal to the byte of pattern, 0 elsewhere.

    Exact per byte (the usual "has zero byte" trick without its borrows), so
    two adjacent flags mean two adjacent matching bytes, in either byte order.
    """
    cdef uint64_t v = word ^ pattern
    cdef uint64_t t = (v & 0x7F7F7F7F7F7F7F7FULL) + 0x7F7F7F7F7F7F7F7FULL
    return ~(t | v | 0x7F7F7F7F7F7F7F7FULL)


@cython.final
cdef class BodyHasher:
    """Streaming canonicalizer + hash of one body, for one (algo, canon, limit)."""

    def __cinit__(self, algo="sha256", canon="simple", limit=None):
        self._out = NULL
        try:
            constructor = _CONSTRUCTORS[algo]
        except (KeyError, TypeError):
            raise ValueError(f"unknown body hash algorithm {algo!r}") from None
        if canon not in _CANONICALIZATIONS:
            raise ValueError(f"unknown body canonicalization {canon!r}")
        # Compared as Python objects first, so that any int works as in _ref:
        # no body is PY_SSIZE_T_MAX bytes long, so a larger limit is none.
        if limit is None:
            self._limit = -1
        elif limit < 0:
            raise ValueError("limit must be >= 0 or None")
        elif limit >= PY_SSIZE_T_MAX:
            self._limit = -1
        else:
            self._limit = limit
        self._hash = constructor()
        self._relaxed = canon == "relaxed"
        self._out = <unsigned char *>PyMem_Malloc(OUT_SIZE)
        if self._out == NULL:
            raise MemoryError()

    def __dealloc__(self):
        PyMem_Free(self._out)

    @property
    def length(self):
        """Canonical bytes hashed so far (held-back bytes not counted)."""
        cdef Py_ssize_t n = self._hashed + self._pos
        if self._limit >= 0 and n > self._limit:
            return self._limit
        return n

    def update(self, chunk):
        """Feed the next piece of the body."""
        cdef Py_buffer view
        cdef const unsigned char *p
        cdef const unsigned char *end
        if self._digest is not None:
            raise ValueError("BodyHasher.update() after digest()")
        PyObject_GetBuffer(chunk, &view, PyBUF_SIMPLE)
        try:
            if self._limit >= 0 and self._hashed + self._pos >= self._limit:
                return  # nothing more can reach the hash
            if view.len == 0:
                return  # (and a held CR stays held)
            p = <const unsigned char *>view.buf
            end = p + view.len
            if self._cr:
                # The CR that ended the last chunk: half a CRLF, or content.
                self._cr = False
                if p[0] == LF:
                    self._crlfs += 1
                    self._sp = False
                    p += 1
                else:
                    self._text_byte(CR)
            if self._relaxed:
                self._update_relaxed(p, end)
            else:
                self._update_simple(p, end)
        finally:
            PyBuffer_Release(&view)

    def digest(self):
        """End of body: release what the rules keep, return the raw digest."""
        if self._digest is None:
            if self._cr:  # a bare CR at the very end is content
                self._cr = False
                self._text_byte(CR)
            if self._content or not self._relaxed:
                self._emit(CRLF, 2)
            self._flush()
            self._digest = self._hash.digest()
        return self._digest

    # -- output ------------------------------------------------------------

    cdef int _flush(self) except -1:
        """Hash what _out holds (cut at the limit)."""
        cdef Py_ssize_t n = self._pos
        self._pos = 0
        if self._limit >= 0 and self._hashed + n > self._limit:
            n = self._limit - self._hashed
        if n > 0:
            self._hash.update(PyMemoryView_FromMemory(<char *>self._out, n, PyBUF_READ))
            self._hashed += n
        return 0

    cdef int _hash_direct(self, const unsigned char *data, Py_ssize_t size) except -1:
        """Hash the caller's bytes in place (after whatever _out holds)."""
        self._flush()
        if self._limit >= 0 and self._hashed + size > self._limit:
            size = self._limit - self._hashed
        if size > 0:
            self._hash.update(PyMemoryView_FromMemory(<char *>data, size, PyBUF_READ))
            self._hashed += size
        return 0

    cdef int _emit(self, const unsigned char *data, Py_ssize_t size) except -1:
        cdef Py_ssize_t room
        while size > 0:
            room = OUT_SIZE - self._pos
            if room == 0:
                self._flush()
                room = OUT_SIZE
            if room > size:
                room = size
            memcpy(self._out + self._pos, data, room)
            self._pos += room
            data += room
            size -= room
        return 0

    cdef int _release_crlfs(self) except -1:
        """Content follows: the held-back line ends were not trailing."""
        cdef Py_ssize_t i, n
        while self._crlfs > 0:
            if self._pos + 2 > OUT_SIZE:
                self._flush()
            n = (OUT_SIZE - self._pos) // 2
            if n > self._crlfs:
                n = self._crlfs
            for i in range(n):
                self._out[self._pos] = CR
                self._out[self._pos + 1] = LF
                self._pos += 2
            self._crlfs -= n
        return 0

    cdef int _text_byte(self, unsigned char c) except -1:
        """One content byte (used for a CR that turned out not to start a CRLF)."""
        cdef unsigned char sp = SP
        self._release_crlfs()
        if self._sp:
            self._emit(&sp, 1)
            self._sp = False
        self._emit(&c, 1)
        self._content = True
        return 0

    # -- the two algorithms ------------------------------------------------

    cdef int _update_simple(self, const unsigned char *p, const unsigned char *end) except -1:
        # Everything is content but the tail: a run of CRLFs (maybe trailing
        # empty lines) and a last CR (maybe half a CRLF).  Find the tail from
        # the end; a CRLF cannot be mistaken, an LF pairs only with the CR
        # before it.
        cdef const unsigned char *tail = end
        cdef Py_ssize_t crlfs = 0
        cdef bint cr = False
        if tail > p and (tail - 1)[0] == CR:
            cr = True
            tail -= 1
        while tail - p >= 2 and (tail - 2)[0] == CR and (tail - 1)[0] == LF:
            tail -= 2
            crlfs += 1
        if tail > p:
            self._release_crlfs()
            if tail - p >= DIRECT_MIN:
                self._hash_direct(p, tail - p)
            else:
                self._emit(p, tail - p)
            self._content = True
        self._crlfs += crlfs
        self._cr = cr
        return 0

    cdef int _update_relaxed(self, const unsigned char *p, const unsigned char *end) except -1:
        # Byte loop with the state in C locals, writing _out directly.  Most
        # bytes are content between two WSP: the inner loop copies such a
        # run with one table look-up per byte, bounded by the room in _out.
        cdef unsigned char c
        cdef unsigned char *out = self._out
        cdef Py_ssize_t pos = self._pos
        cdef const unsigned char *stop
        cdef bint sp = self._sp
        cdef bint content = False
        cdef uint64_t word, spaces
        while p < end:
            c = p[0]
            if c == SP or c == HTAB:
                sp = True
                p += 1
                continue
            if c == CR:
                if p + 1 == end:
                    self._cr = True  # the next chunk decides
                    break
                if p[1] == LF:
                    sp = False  # WSP at the end of a line is ignored
                    self._crlfs += 1
                    p += 2
                    continue
            # Content (a bare CR or LF included): release what was held.
            if self._crlfs:
                self._pos = pos
                self._release_crlfs()
                pos = self._pos
            if pos + 2 > OUT_SIZE:
                self._pos = pos
                self._flush()
                pos = 0
            if sp:
                out[pos] = SP
                pos += 1
                sp = False
            out[pos] = c
            pos += 1
            p += 1
            content = True
            # Eight bytes at a time while they are already canonical: no
            # HTAB, no CR, no two SP in a row, and not ending with SP (what
            # follows it is not known yet).  Typical text is mostly that.
            while end - p >= 8 and OUT_SIZE - pos >= 8:
                memcpy(&word, p, 8)
                spaces = _bytes_equal(word, 0x2020202020202020ULL)
                if (_bytes_equal(word, 0x0909090909090909ULL)
                        | _bytes_equal(word, 0x0D0D0D0D0D0D0D0DULL)
                        | (spaces & (spaces >> 8))) or p[7] == SP:
                    break
                memcpy(out + pos, p, 8)
                pos += 8
                p += 8
            stop = end if end - p <= OUT_SIZE - pos else p + (OUT_SIZE - pos)
            while p < stop and not _SPECIAL[p[0]]:
                out[pos] = p[0]
                pos += 1
                p += 1
        self._pos = pos
        self._sp = sp
        if content:
            self._content = True
        return 0
