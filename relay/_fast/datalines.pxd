# Declarations of relay/_fast/datalines.pyx, for other Cython modules.

cpdef object unstuff_clean(bytes lines, Py_ssize_t max_line)
