"""A block of DATA lines checked and dot-unstuffed at once, in C.

Input: DATA lines and the longest line content allowed.  Output: the lines
dot-unstuffed, or None when a line is not clean text.  The specification is
relay/_ref/datalines.py; this module must return the same for every input
(tests/parity).

How it is fast: one memchr for each line's CR (glibc's is vectorised), two
more over the line for a stray LF or NUL, and the unstuffed lines copied
into one bytes object; a block with no line starting with a dot (nearly
all of them) is returned as it is, with no copy.  The Python version makes
six passes over the block and a list of its lines.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.string cimport memchr, memcpy

cdef enum:
    CR = 0x0D
    LF = 0x0A
    DOT = 0x2E


cdef inline bint _clean_text(const char *start, Py_ssize_t size, Py_ssize_t max_line) noexcept nogil:
    """A line's content (CRLF excluded) holds no LF or NUL and is not too long."""
    return (size <= max_line and memchr(start, LF, size) == NULL
            and memchr(start, 0, size) == NULL)


cpdef object unstuff_clean(bytes lines, Py_ssize_t max_line):
    """``lines`` dot-unstuffed, or None when a line is not clean text."""
    if lines is None:
        raise TypeError("lines must be bytes")
    if max_line < 0:
        raise ValueError("max_line must be >= 0")
    cdef const char *data = PyBytes_AS_STRING(lines)
    cdef const char *end = data + PyBytes_GET_SIZE(lines)
    cdef const char *p = data
    cdef const char *cr
    cdef Py_ssize_t dots = 0
    while p < end:
        cr = <const char *>memchr(p, CR, end - p)
        if cr == NULL:  # a last piece with no CRLF
            if not _clean_text(p, end - p, max_line):
                return None
            dots += p[0] == DOT
            break
        if cr + 1 == end or cr[1] != LF or not _clean_text(p, cr - p, max_line):
            return None
        dots += p < cr and p[0] == DOT
        p = cr + 2
    if dots == 0:
        return lines
    return _unstuffed(data, end, PyBytes_GET_SIZE(lines) - dots)


cdef bytes _unstuffed(const char *data, const char *end, Py_ssize_t size):
    """The (already checked) lines with each one's leading dot removed."""
    cdef bytes out = PyBytes_FromStringAndSize(NULL, size)
    cdef char *o = PyBytes_AS_STRING(out)
    cdef const char *p = data
    cdef const char *next_line
    while p < end:
        next_line = <const char *>memchr(p, LF, end - p)
        next_line = end if next_line == NULL else next_line + 1
        if p[0] == DOT:
            p += 1
        memcpy(o, p, next_line - p)
        o += next_line - p
        p = next_line
    return out
