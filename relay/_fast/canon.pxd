# Declarations of relay/_fast/canon.pyx, for other Cython modules.

cpdef bytes canon_header_simple(bytes name, bytes value)
cpdef bytes canon_header_relaxed(bytes name, bytes value)
