# Declarations of relay/_fast/datalines.pyx, for other Cython modules.

cpdef object unstuff_clean(bytes lines, Py_ssize_t max_line)
cpdef Py_ssize_t whole_lines(buffer) except -1
cpdef bytes dot_stuffed(bytes body)
