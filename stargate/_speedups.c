/* Optional C speedups, each with a pure Python fallback where it is used.
 *
 * apply_mask (stargate.frames): unmasking runs over every byte a client
 * sends, so it is the one loop on the receive path worth compiling.
 *
 * send_many (stargate.connection.SendGroup): a broadcast's walk over its
 * listeners, one send() each, with the GIL released once for all of them
 * instead of once per listener and no Python call per listener.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <errno.h>
#include <stdint.h>
#include <string.h>
#ifndef _WIN32
#include <sys/socket.h>
#include <sys/types.h>
#endif

static PyObject *
apply_mask(PyObject *self, PyObject *args)
{
    Py_buffer data, mask;
    PyObject *result = NULL;

    if (!PyArg_ParseTuple(args, "y*y*:apply_mask", &data, &mask)) {
        return NULL;
    }
    if (mask.len != 4) {
        PyErr_Format(PyExc_ValueError, "mask must be 4 bytes, got %zd", mask.len);
        goto done;
    }
    result = PyBytes_FromStringAndSize(NULL, data.len);
    if (result == NULL) {
        goto done;
    }

    const unsigned char *in = (const unsigned char *)data.buf;
    const unsigned char *key = (const unsigned char *)mask.buf;
    unsigned char *out = (unsigned char *)PyBytes_AS_STRING(result);
    Py_ssize_t n = data.len, i = 0;

    /* Eight bytes at a time: the mask repeated twice, in memory order. */
    unsigned char key8[8];
    for (int k = 0; k < 8; k++) {
        key8[k] = key[k & 3];
    }
    uint64_t wide_key;
    memcpy(&wide_key, key8, 8);
    for (; i + 8 <= n; i += 8) {
        uint64_t chunk;
        memcpy(&chunk, in + i, 8);
        chunk ^= wide_key;
        memcpy(out + i, &chunk, 8);
    }
    for (; i < n; i++) {
        out[i] = in[i] ^ key[i & 3];
    }

done:
    PyBuffer_Release(&data);
    PyBuffer_Release(&mask);
    return result;
}

#ifndef _WIN32

#ifndef MSG_NOSIGNAL
#define MSG_NOSIGNAL 0
#endif

static PyObject *str_writable;       /* "_writable" */
static PyObject *str_messages_sent;  /* "messages_sent" */
static PyObject *one;               /* 1 */

/* Where instances of one class keep _writable and messages_sent, when both
 * are plain __slots__ slots (as on stargate.connection.WebSocket): read and
 * written there directly, without CPython's generic attribute lookup, which
 * was most of the walk's own cost. -1: not a slot; use getattr/setattr. */
struct layout {
    PyTypeObject *type;
    Py_ssize_t writable;
    Py_ssize_t counter;
};

static Py_ssize_t
slot_offset(PyTypeObject *type, PyObject *name)
{
    /* A slot is a member descriptor on the class: getattr(cls, name). A
     * subclass that shadows it (a property) is not a member descriptor. */
    PyObject *descr = PyObject_GetAttr((PyObject *)type, name);
    Py_ssize_t offset = -1;
    if (descr == NULL) {
        PyErr_Clear();
        return -1;
    }
    if (Py_IS_TYPE(descr, &PyMemberDescr_Type)) {
        PyMemberDef *member = ((PyMemberDescrObject *)descr)->d_member;
        if (member->type == T_OBJECT_EX && !(member->flags & READONLY)) {
            offset = member->offset;
        }
    }
    Py_DECREF(descr);
    return offset;
}

static PyObject *
get_field(PyObject *obj, Py_ssize_t offset, PyObject *name)
{
    if (offset >= 0) {
        PyObject *value = *(PyObject **)((char *)obj + offset);
        if (value != NULL) {
            return Py_NewRef(value);
        }
    }
    return PyObject_GetAttr(obj, name);  /* unset: raises AttributeError */
}

/* 1 if `websocket` is writable, after counting the message it is about to
 * be sent (messages_sent += 1); 0 if it is not; -1 on error. */
static int
count_if_writable(PyObject *websocket, struct layout *layout)
{
    if (Py_TYPE(websocket) != layout->type) {
        layout->type = Py_TYPE(websocket);
        layout->writable = slot_offset(layout->type, str_writable);
        layout->counter = slot_offset(layout->type, str_messages_sent);
    }
    PyObject *writable = get_field(websocket, layout->writable, str_writable);
    if (writable == NULL) {
        return -1;
    }
    int yes = writable == Py_True ? 1 : PyObject_IsTrue(writable);
    Py_DECREF(writable);
    if (yes <= 0) {
        return yes;
    }
    PyObject *before = get_field(websocket, layout->counter, str_messages_sent);
    if (before == NULL) {
        return -1;
    }
    PyObject *after = PyNumber_Add(before, one);
    Py_DECREF(before);
    if (after == NULL) {
        return -1;
    }
    if (layout->counter >= 0) {
        PyObject **slot = (PyObject **)((char *)websocket + layout->counter);
        PyObject *old = *slot;
        *slot = after;  /* the slot takes our reference */
        Py_XDECREF(old);
        return 1;
    }
    int failed = PyObject_SetAttr(websocket, str_messages_sent, after);
    Py_DECREF(after);
    return failed ? -1 : 1;
}

struct target {
    PyObject *websocket;  /* a strong reference */
    int fd;
    int error;            /* errno when sent < 0 */
    Py_ssize_t sent;
};

/* send_many(members, data) -> (sent, rest)
 *
 * members: {WebSocket: descriptor}. For every member whose _writable is
 * True: messages_sent += 1 and one non-blocking send() of data (all of them
 * with the GIL released). sent counts the members that took all of data;
 * rest lists (websocket, what) for the others: None when it was not
 * writable (nothing was done), the byte count of a partial write, or the
 * OSError. SendGroup.send hands each of those to the connection's normal
 * path, exactly as WebSocket.send_prepared does. */
static PyObject *
send_many(PyObject *self, PyObject *args)
{
    PyObject *members, *rest = NULL, *result = NULL;
    Py_buffer data;
    struct target *targets = NULL;
    Py_ssize_t count = 0, sent = 0, i;

    if (!PyArg_ParseTuple(args, "O!y*:send_many", &PyDict_Type, &members, &data)) {
        return NULL;
    }
    rest = PyList_New(0);
    if (rest == NULL) {
        goto done;
    }
    count = PyDict_GET_SIZE(members);
    targets = PyMem_Calloc(count ? count : 1, sizeof(struct target));
    if (targets == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    /* Take the members first: nothing below may change the dict under a
     * PyDict_Next walk. */
    {
        Py_ssize_t pos = 0, k = 0;
        PyObject *key, *value;
        while (k < count && PyDict_Next(members, &pos, &key, &value)) {
            int fd = (int)PyLong_AsLong(value);
            if (fd == -1 && PyErr_Occurred()) {
                goto done;
            }
            Py_INCREF(key);
            targets[k].websocket = key;
            targets[k].fd = fd;
            k++;
        }
        count = k;
    }
    /* Which are writable now; count the message for those. */
    struct layout layout = {NULL, -1, -1};
    for (i = 0; i < count; i++) {
        int yes = count_if_writable(targets[i].websocket, &layout);
        if (yes < 0) {
            goto done;
        }
        if (!yes || targets[i].fd < 0) {
            targets[i].fd = -1;
        }
    }
    /* The system calls, without the GIL. */
    {
        const char *buf = (const char *)data.buf;
        size_t len = (size_t)data.len;
        Py_BEGIN_ALLOW_THREADS
        for (i = 0; i < count; i++) {
            ssize_t n;
            if (targets[i].fd < 0) {
                continue;
            }
            do {
                n = send(targets[i].fd, buf, len, MSG_DONTWAIT | MSG_NOSIGNAL);
            } while (n < 0 && errno == EINTR);
            targets[i].sent = n;
            targets[i].error = n < 0 ? errno : 0;
        }
        Py_END_ALLOW_THREADS
    }
    for (i = 0; i < count; i++) {
        PyObject *what;
        if (targets[i].fd < 0) {
            what = Py_NewRef(Py_None);
        }
        else if (targets[i].sent == data.len) {
            sent++;
            continue;
        }
        else if (targets[i].sent >= 0) {
            what = PyLong_FromSsize_t(targets[i].sent);
        }
        else {
            /* OSError(errno, strerror) is the matching subclass
             * (BlockingIOError, BrokenPipeError...), as socket.send raises. */
            what = PyObject_CallFunction(PyExc_OSError, "is", targets[i].error,
                                         strerror(targets[i].error));
        }
        if (what == NULL) {
            goto done;
        }
        PyObject *pair = PyTuple_Pack(2, targets[i].websocket, what);
        Py_DECREF(what);
        if (pair == NULL || PyList_Append(rest, pair) < 0) {
            Py_XDECREF(pair);
            goto done;
        }
        Py_DECREF(pair);
    }
    result = Py_BuildValue("nO", sent, rest);

done:
    if (targets != NULL) {
        for (i = 0; i < count; i++) {
            Py_XDECREF(targets[i].websocket);
        }
        PyMem_Free(targets);
    }
    Py_XDECREF(rest);
    PyBuffer_Release(&data);
    return result;
}

#endif  /* _WIN32 */

static PyMethodDef speedups_methods[] = {
    {"apply_mask", apply_mask, METH_VARARGS,
     "apply_mask(data, mask) -> bytes: XOR data with the repeated 4-byte mask."},
#ifndef _WIN32
    {"send_many", send_many, METH_VARARGS,
     "send_many(members, data) -> (sent, rest): a broadcast's send() walk."},
#endif
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef speedups_module = {
    PyModuleDef_HEAD_INIT, "stargate._speedups",
    "Optional C speedups for stargate.frames and stargate.connection.", -1,
    speedups_methods,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
#ifndef _WIN32
    str_writable = PyUnicode_InternFromString("_writable");
    str_messages_sent = PyUnicode_InternFromString("messages_sent");
    one = PyLong_FromLong(1);
    if (str_writable == NULL || str_messages_sent == NULL || one == NULL) {
        return NULL;
    }
#endif
    return PyModule_Create(&speedups_module);
}
