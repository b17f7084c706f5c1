/* Python boundary of clowderd._native: argument parsing and validation with the GIL held, byte work
 * without it. The typed contract is clowderd/_native.pyi. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <unistd.h>

#include "blake3.h"
#include "chunker.h"
#include "ingest.h"

/* Reads cuts (a sequence of ints) into a new array; on failure sets an exception and returns -1. */
static int read_cuts(PyObject *obj, uint64_t **cuts, size_t *ncuts)
{
    *cuts = NULL;
    *ncuts = 0;
    if (!obj)
        return 0;
    PyObject *seq = PySequence_Fast(obj, "cuts must be a sequence of ints");
    if (!seq)
        return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    uint64_t *v = PyMem_Malloc((n ? (size_t)n : 1) * sizeof *v);
    if (!v) {
        Py_DECREF(seq);
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        long long c = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(seq, i));
        if (c == -1 && PyErr_Occurred()) {
            if (PyErr_ExceptionMatches(PyExc_OverflowError)) {
                PyErr_Clear();
                PyErr_SetString(PyExc_ValueError, "cut out of range: every cut must satisfy 0 < cut < len(data)");
            }
            goto fail;
        }
        if (c <= 0) {
            PyErr_SetString(PyExc_ValueError, "cut out of range: every cut must satisfy 0 < cut < len(data)");
            goto fail;
        }
        v[i] = (uint64_t)c;
    }
    Py_DECREF(seq);
    *cuts = v;
    *ncuts = (size_t)n;
    return 0;
fail:
    Py_DECREF(seq);
    PyMem_Free(v);
    return -1;
}

/* Checks sizes and thread count (0: one per online CPU); on failure sets ValueError, returns -1. */
static int read_params(Py_ssize_t min, Py_ssize_t avg, Py_ssize_t max, int *threads, cdc_params *p)
{
    if (min <= 0 || avg <= 0 || max <= 0) {
        PyErr_SetString(PyExc_ValueError, "min_size, avg_size and max_size must be positive");
        return -1;
    }
    *p = (cdc_params){(size_t)min, (size_t)avg, (size_t)max};
    const char *err = cdc_check_params(p);
    if (err) {
        PyErr_SetString(PyExc_ValueError, err);
        return -1;
    }
    if (*threads < 0) {
        PyErr_SetString(PyExc_ValueError, "threads must be >= 0");
        return -1;
    }
    if (*threads == 0) {
        long n = sysconf(_SC_NPROCESSORS_ONLN);
        *threads = n > 0 ? (int)n : 1;
    }
    return 0;
}

static PyObject *chunk_list(const cdc_chunks *v)
{
    PyObject *list = PyList_New((Py_ssize_t)v->n);
    if (!list)
        return NULL;
    for (size_t i = 0; i < v->n; i++) {
        PyObject *t = Py_BuildValue("(KKy#)", (unsigned long long)v->v[i].off, (unsigned long long)v->v[i].len,
                                    (const char *)v->v[i].id, (Py_ssize_t)32);
        if (!t) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, (Py_ssize_t)i, t);
    }
    return list;
}

static PyObject *set_errno(int e)
{
    if (e == -1)
        return PyErr_Format(PyExc_RuntimeError, "sha256 through OpenSSL failed");
    if (e == ENOMEM)
        return PyErr_NoMemory();
    errno = e;
    return PyErr_SetFromErrno(PyExc_OSError);
}

static PyObject *py_blake3(PyObject *self, PyObject *arg)
{
    Py_buffer buf;
    uint8_t out[BLAKE3_OUT_LEN];
    if (PyObject_GetBuffer(arg, &buf, PyBUF_C_CONTIGUOUS) < 0)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    blake3(buf.buf, (size_t)buf.len, out);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&buf);
    return PyBytes_FromStringAndSize((const char *)out, sizeof out);
}

static PyObject *py_blake3_use_kernel(PyObject *self, PyObject *arg)
{
    const char *name = PyUnicode_AsUTF8(arg);
    if (!name)
        return NULL;
    const char *previous = blake3_kernel();
    if (blake3_use_kernel(name) < 0) {
        const char *names[4];
        size_t n = blake3_kernels(names);
        PyObject *known = PyUnicode_FromString(names[0]);
        for (size_t i = 1; known && i < n; i++)
            Py_SETREF(known, PyUnicode_FromFormat("%U, %s", known, names[i]));
        if (known)
            PyErr_Format(PyExc_ValueError, "BLAKE3 kernel %R: this CPU runs %U", arg, known);
        Py_XDECREF(known);
        return NULL;
    }
    return PyUnicode_FromString(previous);
}

static PyObject *py_blake3_many(PyObject *self, PyObject *args)
{
    PyObject *data, *lengths_obj, *out = NULL;
    if (!PyArg_ParseTuple(args, "OO:blake3_many", &data, &lengths_obj))
        return NULL;
    PyObject *seq = PySequence_Fast(lengths_obj, "lengths must be a sequence of ints");
    if (!seq)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    Py_buffer buf = {0};
    uint64_t *lens = PyMem_Malloc((size_t)(n ? n : 1) * sizeof *lens);
    if (!lens) {
        PyErr_NoMemory();
        goto done;
    }
    uint64_t total = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        long long v = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(seq, i));
        if (v == -1 && PyErr_Occurred())
            goto done;
        if (v < 0) {
            PyErr_SetString(PyExc_ValueError, "lengths must not be negative");
            goto done;
        }
        lens[i] = (uint64_t)v;
        total += lens[i];
    }
    if (PyObject_GetBuffer(data, &buf, PyBUF_C_CONTIGUOUS) < 0)
        goto done;
    if (total != (uint64_t)buf.len) {
        PyErr_Format(PyExc_ValueError, "the lengths add up to %llu bytes, data has %zd", (unsigned long long)total,
                     buf.len);
        goto done;
    }
    out = PyBytes_FromStringAndSize(NULL, n * BLAKE3_OUT_LEN);
    if (!out)
        goto done;
    uint8_t *ids = (uint8_t *)PyBytes_AS_STRING(out);
    const uint8_t *p = buf.buf;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) {
        blake3(p, (size_t)lens[i], ids + i * BLAKE3_OUT_LEN);
        p += lens[i];
    }
    Py_END_ALLOW_THREADS
done:
    if (buf.obj)
        PyBuffer_Release(&buf);
    PyMem_Free(lens);
    Py_DECREF(seq);
    return out;
}

static PyObject *py_chunk(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"data", "cuts", "min_size", "avg_size", "max_size", "threads", NULL};
    PyObject *data, *cuts_obj = NULL, *result = NULL;
    Py_ssize_t min = CDC_MIN_SIZE, avg = CDC_AVG_SIZE, max = CDC_MAX_SIZE;
    int threads = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|O$nnni:chunk", kwlist, &data, &cuts_obj, &min, &avg, &max,
                                     &threads))
        return NULL;
    cdc_params p;
    if (read_params(min, avg, max, &threads, &p) < 0)
        return NULL;
    Py_buffer buf;
    if (PyObject_GetBuffer(data, &buf, PyBUF_C_CONTIGUOUS) < 0)
        return NULL;
    uint64_t *cuts;
    size_t ncuts;
    if (read_cuts(cuts_obj, &cuts, &ncuts) < 0)
        goto out;
    const char *err = cdc_check_cuts(cuts, ncuts, (uint64_t)buf.len);
    if (err) {
        PyErr_SetString(PyExc_ValueError, err);
        goto out;
    }
    cdc_chunks chunks;
    int e;
    Py_BEGIN_ALLOW_THREADS
    e = cdc_run(buf.buf, (uint64_t)buf.len, cuts, ncuts, &p, threads, -1, &chunks);
    Py_END_ALLOW_THREADS
    if (e)
        set_errno(e);
    else
        result = chunk_list(&chunks);
    free(chunks.v);
out:
    PyMem_Free(cuts);
    PyBuffer_Release(&buf);
    return result;
}

static PyObject *py_ingest(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"src_fd", "dst_fd", "cuts", "min_size", "avg_size", "max_size", "threads", NULL};
    PyObject *cuts_obj = NULL, *result = NULL;
    int src_fd, dst_fd, threads = 0;
    Py_ssize_t min = CDC_MIN_SIZE, avg = CDC_AVG_SIZE, max = CDC_MAX_SIZE;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "ii|O$nnni:ingest", kwlist, &src_fd, &dst_fd, &cuts_obj, &min,
                                     &avg, &max, &threads))
        return NULL;
    if (dst_fd < -1) {
        errno = EBADF;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    cdc_params p;
    uint64_t *cuts;
    size_t ncuts;
    int chunk_threads_default = threads == 0;
    if (read_params(min, avg, max, &threads, &p) < 0 || read_cuts(cuts_obj, &cuts, &ncuts) < 0)
        return NULL;
    /* sha256 is serial and the longest job: by default it keeps a CPU to itself. */
    if (chunk_threads_default && threads > 1)
        threads--;
    ingest_src src;
    int e;
    Py_BEGIN_ALLOW_THREADS
    e = ingest_map(src_fd, &src);
    Py_END_ALLOW_THREADS
    if (e) {
        set_errno(e);
        PyMem_Free(cuts);
        return NULL;
    }
    const char *err = cdc_check_cuts(cuts, ncuts, src.size);
    if (err) {
        PyErr_SetString(PyExc_ValueError, err);
        goto out;
    }
    uint8_t digest[32];
    cdc_chunks chunks;
    Py_BEGIN_ALLOW_THREADS
    e = ingest_run(&src, dst_fd, cuts, ncuts, &p, threads, digest, &chunks);
    Py_END_ALLOW_THREADS
    if (e) {
        set_errno(e);
        goto out;
    }
    PyObject *list = chunk_list(&chunks);
    free(chunks.v);
    if (list)
        result = Py_BuildValue("(y#N)", (const char *)digest, (Py_ssize_t)32, list);
out:
    Py_BEGIN_ALLOW_THREADS
    ingest_unmap(&src);
    Py_END_ALLOW_THREADS
    PyMem_Free(cuts);
    return result;
}

static PyMethodDef methods[] = {
    {"blake3", py_blake3, METH_O, "blake3(data) -> bytes: the 32-byte BLAKE3 hash of data."},
    {"blake3_many", py_blake3_many, METH_VARARGS,
     "blake3_many(data, lengths) -> bytes: the BLAKE3 of each piece of data (cut after each of lengths), joined."},
    {"blake3_use_kernel", py_blake3_use_kernel, METH_O,
     "blake3_use_kernel(name) -> str: make name (one of BLAKE3_KERNELS) the BLAKE3 kernel; returns the previous."},
    {"chunk", (PyCFunction)(void (*)(void))py_chunk, METH_VARARGS | METH_KEYWORDS,
     "chunk(data, cuts=(), *, min_size, avg_size, max_size, threads=0) -> [(offset, length, blake3)]"},
    {"ingest", (PyCFunction)(void (*)(void))py_ingest, METH_VARARGS | METH_KEYWORDS,
     "ingest(src_fd, dst_fd, cuts=(), *, min_size, avg_size, max_size, threads=0) -> (sha256, chunks)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "clowderd._native",
    "FastCDC chunking, BLAKE3 and sha256 ingest in C; see native/README.md.", -1, methods,
};

PyMODINIT_FUNC PyInit__native(void)
{
    blake3_init();
    cdc_init();
    PyObject *m = PyModule_Create(&module);
    if (!m)
        return NULL;
    if (PyModule_AddIntConstant(m, "MIN_SIZE", CDC_MIN_SIZE) < 0 ||
        PyModule_AddIntConstant(m, "AVG_SIZE", CDC_AVG_SIZE) < 0 ||
        PyModule_AddIntConstant(m, "MAX_SIZE", CDC_MAX_SIZE) < 0 ||
        PyModule_AddStringConstant(m, "BLAKE3_KERNEL", blake3_kernel()) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    const char *names[4];
    size_t n = blake3_kernels(names);
    PyObject *kernels = PyTuple_New((Py_ssize_t)n);
    for (size_t i = 0; kernels && i < n; i++) {
        PyObject *name = PyUnicode_FromString(names[i]);
        if (!name)
            Py_CLEAR(kernels);
        else
            PyTuple_SET_ITEM(kernels, (Py_ssize_t)i, name);
    }
    if (!kernels || PyModule_AddObject(m, "BLAKE3_KERNELS", kernels) < 0) {
        Py_XDECREF(kernels);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
