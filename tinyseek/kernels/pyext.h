/* The CPython-extension half of a kernel source (compiled only with -DTS_PYEXT, see loader.py):
   Python.h, ts_int_args (the METH_FASTCALL arguments as integers) and PTR (one of them as a pointer).
   A source includes it with #include "pyext.h" (loader.source() inlines it, so a built source is
   self-contained). */
#ifndef TS_PYEXT_H
#define TS_PYEXT_H
#ifdef TS_PYEXT
#define PY_SSIZE_T_CLEAN
#include <Python.h>
/* argument i of v as a pointer of type t */
#define PTR(t, i) ((t)(intptr_t)v[i])
/* v[0..want) = the call's integer arguments: 0, or -1 with a Python exception set */
static inline int ts_int_args(PyObject* const* args, Py_ssize_t nargs, Py_ssize_t want, long long* v) {
  if (nargs != want) {
    PyErr_Format(PyExc_TypeError, "expected %zd integer arguments, got %zd", want, nargs);
    return -1;
  }
  for (Py_ssize_t i = 0; i < want; ++i) {
    v[i] = PyLong_AsLongLong(args[i]);
    if (v[i] == -1 && PyErr_Occurred()) return -1;
  }
  return 0;
}
#endif
#endif
