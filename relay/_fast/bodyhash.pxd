# Declarations of relay/_fast/bodyhash.pyx, for other Cython modules.

cimport cython


@cython.final
cdef class BodyHasher:
    cdef object _hash            # hashlib object
    cdef bint _relaxed
    cdef Py_ssize_t _limit       # -1: no limit
    cdef Py_ssize_t _hashed      # bytes passed to the hash so far
    cdef Py_ssize_t _crlfs       # line ends held back (maybe trailing)
    cdef bint _sp                # a WSP run held back (relaxed)
    cdef bint _cr                # the last chunk ended with CR
    cdef bint _content           # any content released (relaxed's final CRLF)
    cdef unsigned char *_out     # canonical bytes waiting for the hash
    cdef Py_ssize_t _pos         # bytes used in _out
    cdef bytes _digest

    cdef int _flush(self) except -1
    cdef int _hash_direct(self, const unsigned char *data, Py_ssize_t size) except -1
    cdef int _emit(self, const unsigned char *data, Py_ssize_t size) except -1
    cdef int _release_crlfs(self) except -1
    cdef int _text_byte(self, unsigned char c) except -1
    cdef int _update_simple(self, const unsigned char *p, const unsigned char *end) except -1
    cdef int _update_relaxed(self, const unsigned char *p, const unsigned char *end) except -1
