# Types for the compiled structural walk (Cython augmenting .pxd; decision 0006). Only used when
# structure.py is compiled; plain Python ignores this file. Typed attributes are C struct fields
# and cpdef methods are C calls between each other: that, not the compilation alone, is most of
# the gain (the module compiled without this file: 5-8% faster; with it: about 17%).
cimport cython

cdef class _Spec:
    cdef public object binding, checks, child, element, fast, fast_class, json_kind, key, low, max
    cdef public object name, prim_checks, regex, segment, targets, type_code, value_set
    cdef public _Table table
    cdef public bint choice, plain, repeats
    cdef public int kind

cdef class _Table:
    cdef public object checks, ctx, names, required
    cdef public dict specs
    cdef public bint is_extension

cdef class _Walk:
    cdef public object env
    cdef public bint extended
    cdef public list issues
    cdef public int depth
    @cython.locals(spec=_Spec, specs=dict, choices=dict, extensions=bint, has_value=bint)
    cpdef complex(self, object node, _Table table, object path, object checks, bint resource_root=*)
    @cython.locals(table=_Table)
    cpdef repeating(self, object value, _Spec spec, object path)
    cpdef item(self, object value, _Spec spec, object path)
    cpdef primitive(self, object value, _Spec spec, object path)
    cpdef reference(self, dict node, _Spec spec, object path)
