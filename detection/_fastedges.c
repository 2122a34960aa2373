/* The per-edge steps of the detection engine that were its costliest Python, in C:
 * detection.baseline's generalised path (generalise) and pattern count (count_pattern), and
 * detection.graph's look back of a burst or repeat merge (burst_redundant).
 *
 * Each has its Python original beside it, kept as the reference and as the fallback when
 * this module is not built (setup.py builds it optionally, like _fastparse). Each takes the
 * common types only and returns None, having changed nothing, for anything else, which the
 * Python then handles; tests/detection/test_native.py compares each with its original.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <float.h>
#include <math.h>
#include <string.h>

/* ------------------------------------------------------------------------------------
 * generalise(path): detection.baseline's generalised path (_generalise_py, four regular
 * expression passes) for a path of ASCII characters, or None for any other argument (the
 * Python passes then run). The passes, in order, each on the previous one's output:
 *   ^/home/[^/]+ -> "~" (once), then a leading "/root/" -> "~/";
 *   \b[0-9a-f]{12,}\b -> "<hex>": a maximal run of lower-case hex digits of at least 12
 *     that starts and ends at a word boundary (word characters: ASCII letters, digits and
 *     "_"; a shorter end would put the boundary between two hex digits, so only the
 *     maximal run can match);
 *   [A-Za-z0-9]{6,} -> _fold_random's answer: "<rand>" for a run with both cases, or with
 *     one case and a digit before its trailing digits, else the run itself;
 *   \d+ -> "#".
 * No pass makes its text longer, so one buffer of the path's length holds every step.
 */
static int
is_word(unsigned char c)
{
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_';
}

static int
is_lower_hex(unsigned char c)
{
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f');
}

static int
is_alnum(unsigned char c)
{
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
}

/* _fold_random of the run t[0:n] (ASCII letters and digits): 1 when it becomes "<rand>" */
static int
random_token(const unsigned char *t, Py_ssize_t n)
{
    int lower = 0, upper = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        lower |= t[i] >= 'a' && t[i] <= 'z';
        upper |= t[i] >= 'A' && t[i] <= 'Z';
    }
    if (lower && upper)
        return 1;
    if (!(lower || upper))
        return 0;
    Py_ssize_t end = n;
    while (end > 0 && t[end - 1] >= '0' && t[end - 1] <= '9')
        end--;
    for (Py_ssize_t i = 0; i < end; i++) {
        if (t[i] >= '0' && t[i] <= '9')
            return 1;  /* a digit before the trailing ones: rstrip(digits) is not alpha */
    }
    return 0;
}

static PyObject *
generalise(PyObject *module, PyObject *path)
{
    if (!PyUnicode_CheckExact(path) || !PyUnicode_IS_ASCII(path))
        Py_RETURN_NONE;
    Py_ssize_t n = PyUnicode_GET_LENGTH(path);
    const unsigned char *s = PyUnicode_1BYTE_DATA(path);
    unsigned char stack[512];
    unsigned char *a = n <= (Py_ssize_t)sizeof(stack) / 2 ? stack : PyMem_Malloc(2 * (n + 1));
    if (a == NULL)
        return PyErr_NoMemory();
    unsigned char *b = a == stack ? stack + sizeof(stack) / 2 : a + n + 1;
    Py_ssize_t m = 0, k, i;

    /* the home directory (a path that took "~" for one no longer starts with "/root/") */
    if (n > 6 && memcmp(s, "/home/", 6) == 0 && s[6] != '/') {
        i = 6;
        while (i < n && s[i] != '/')
            i++;
        a[m++] = '~';
        memcpy(a + m, s + i, n - i);
        m += n - i;
    } else if (n >= 6 && memcmp(s, "/root/", 6) == 0) {
        a[m++] = '~';
        memcpy(a + m, s + 5, n - 5);
        m += n - 5;
    } else {
        memcpy(a, s, n);
        m = n;
    }
    /* hex ids: a -> b */
    k = 0;
    for (i = 0; i < m;) {
        if (is_lower_hex(a[i]) && (i == 0 || !is_word(a[i - 1]))) {
            Py_ssize_t j = i;
            while (j < m && is_lower_hex(a[j]))
                j++;
            if (j - i >= 12 && (j == m || !is_word(a[j]))) {
                memcpy(b + k, "<hex>", 5);
                k += 5;
                i = j;
                continue;
            }
        }
        b[k++] = a[i++];
    }
    m = k;
    /* random tokens: b -> a */
    k = 0;
    for (i = 0; i < m;) {
        if (is_alnum(b[i])) {
            Py_ssize_t j = i;
            while (j < m && is_alnum(b[j]))
                j++;
            if (j - i >= 6 && random_token(b + i, j - i)) {
                memcpy(a + k, "<rand>", 6);
                k += 6;
            } else {
                memcpy(a + k, b + i, j - i);
                k += j - i;
            }
            i = j;
            continue;
        }
        a[k++] = b[i++];
    }
    m = k;
    /* digit runs: a -> b */
    k = 0;
    for (i = 0; i < m;) {
        if (a[i] >= '0' && a[i] <= '9') {
            while (i < m && a[i] >= '0' && a[i] <= '9')
                i++;
            b[k++] = '#';
            continue;
        }
        b[k++] = a[i++];
    }
    PyObject *out = PyUnicode_FromStringAndSize((const char *)b, k);
    if (a != stack)
        PyMem_Free(a);
    return out;
}

/* ------------------------------------------------------------------------------------
 * count_pattern(counts, dirty, pattern, auid, ts, half_life): detection.baseline's
 * BehaviourModel._count in C. The pattern's host key ("h\x1f" + the items joined by
 * "\x1f") and, when auid is not None, its user key ("u<auid>\x1f" + the same) each get
 * their decayed count plus one and the later of ts and their last time in counts, and
 * go into dirty; returns the higher of the two counts before (a float). Returns None,
 * having changed nothing, for anything but the common types (a tuple of str, an int or
 * None auid, float times and counts, all finite) and when a decay factor is subnormal
 * (where float.__pow__ may raise): _count then does it in Python.
 */
static PyObject *S_SEP, *S_HOST;

/* The stored (count, last) of key, checked: 1 found (*count, *last set; *last borrowed),
 * 0 absent, -1 not the common types, -2 an error */
static int
stored(PyObject *counts, PyObject *key, double *count, PyObject **last)
{
    PyObject *cur = PyDict_GetItemWithError(counts, key);
    if (cur == NULL)
        return PyErr_Occurred() ? -2 : 0;
    if (!PyTuple_CheckExact(cur) || PyTuple_GET_SIZE(cur) != 2 ||
        !PyFloat_CheckExact(PyTuple_GET_ITEM(cur, 0)) || !PyFloat_CheckExact(PyTuple_GET_ITEM(cur, 1)))
        return -1;
    *count = PyFloat_AS_DOUBLE(PyTuple_GET_ITEM(cur, 0));
    *last = PyTuple_GET_ITEM(cur, 1);
    return isfinite(*count) && isfinite(PyFloat_AS_DOUBLE(*last)) ? 1 : -1;
}

/* BehaviourModel._decayed: 0 with *out set, -1 not computed here */
static int
decayed(int found, double count, PyObject *last, double ts, double half_life, double *out)
{
    if (!found) {
        *out = 0.0;
        return 0;
    }
    double l = PyFloat_AS_DOUBLE(last);
    if (ts <= l) {
        *out = count;
        return 0;
    }
    double f = pow(0.5, (ts - l) / half_life);
    if (f != 0.0 && f < DBL_MIN)
        return -1;
    *out = count * f;
    return 0;
}

/* "u<auid>\x1f" (borrowed, NULL on an error), remembered per auid: a host has few login
 * users, and formatting the number was a large part of a count (emptied when full) */
static PyObject *USER_PREFIXES;

static PyObject *
user_prefix(PyObject *auid)
{
    PyObject *prefix = PyDict_GetItemWithError(USER_PREFIXES, auid);
    if (prefix != NULL || PyErr_Occurred())
        return prefix;
    if (PyDict_GET_SIZE(USER_PREFIXES) >= 1024)
        PyDict_Clear(USER_PREFIXES);
    prefix = PyUnicode_FromFormat("u%S\x1f", auid);
    if (prefix == NULL)
        return NULL;
    int rc = PyDict_SetItem(USER_PREFIXES, auid, prefix);
    Py_DECREF(prefix);  /* the dict holds it */
    return rc < 0 ? NULL : prefix;
}

static PyObject *
count_pattern(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 6 || !PyDict_Check(args[0]) || !PySet_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError,
                        "count_pattern(counts: dict, dirty: set, pattern, auid, ts, half_life)");
        return NULL;
    }
    PyObject *counts = args[0], *dirty = args[1], *pattern = args[2], *auid = args[3];
    PyObject *ts_obj = args[4];
    if (!PyTuple_CheckExact(pattern) || !PyFloat_CheckExact(ts_obj) ||
        !PyFloat_CheckExact(args[5]) || !(auid == Py_None || PyLong_CheckExact(auid)))
        Py_RETURN_NONE;
    double ts = PyFloat_AS_DOUBLE(ts_obj), half_life = PyFloat_AS_DOUBLE(args[5]);
    if (!isfinite(ts) || !(half_life > 0.0) || !isfinite(half_life))
        Py_RETURN_NONE;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(pattern); i++) {
        if (!PyUnicode_CheckExact(PyTuple_GET_ITEM(pattern, i)))
            Py_RETURN_NONE;  /* str(item) is Python's to call */
    }
    PyObject *keys[2] = {NULL, NULL}, *values[2] = {NULL, NULL}, *result = NULL;
    PyObject *joined = PyUnicode_Join(S_SEP, pattern);
    if (joined == NULL)
        return NULL;
    keys[0] = PyUnicode_Concat(S_HOST, joined);
    if (keys[0] != NULL && auid != Py_None) {
        PyObject *prefix = user_prefix(auid);
        keys[1] = prefix ? PyUnicode_Concat(prefix, joined) : NULL;
    }
    Py_DECREF(joined);
    int nkeys = auid == Py_None ? 1 : 2;
    if (keys[nkeys - 1] == NULL)
        goto done;
    double before = 0.0;
    /* every check before the first change: None leaves counts and dirty as they were */
    for (int k = 0; k < nkeys; k++) {
        double count = 0.0, now;
        PyObject *last = NULL;
        int found = stored(counts, keys[k], &count, &last);
        if (found == -2)
            goto done;
        if (found == -1 || decayed(found, count, last, ts, half_life, &now) < 0) {
            result = Py_NewRef(Py_None);
            goto done;
        }
        /* (before + 1.0, max(ts, last)): max keeps ts unless last is greater */
        PyObject *later = found && PyFloat_AS_DOUBLE(last) > ts ? last : ts_obj;
        values[k] = Py_BuildValue("(dO)", now + 1.0, later);
        if (values[k] == NULL)
            goto done;
        if (k == 0 || now > before)  /* max(before, user) */
            before = now;
    }
    for (int k = 0; k < nkeys; k++) {
        if (PyDict_SetItem(counts, keys[k], values[k]) < 0 || PySet_Add(dirty, keys[k]) < 0)
            goto done;
    }
    result = PyFloat_FromDouble(before);
done:
    for (int k = 0; k < 2; k++) {
        Py_XDECREF(keys[k]);
        Py_XDECREF(values[k]);
    }
    return result;
}

/* ------------------------------------------------------------------------------------
 * burst_redundant(edges, f_edges, files, prev, pnid, nid, lookback): detection.graph's
 * ProvenanceGraph._burst_redundant in C: whether a process's last edge (prev on the file
 * node pnid, "file:" + path) repeats a retained change among its previous lookback edges,
 * f_edges being that file's edges and files the graph's path -> FileNode. Reads only.
 * Returns True or False, or None for anything but the common types (edges as
 * (ts, op, node id) tuples with str ops and str or None ids, str arguments), which the
 * Python method then decides.
 */
static PyObject *S_EDGES;

/* 1 when the str b starts with the first n code points of the str a (b.startswith(a[:n])) */
static int
starts_with(PyObject *b, PyObject *a, Py_ssize_t n)
{
    if (PyUnicode_GET_LENGTH(b) < n)
        return 0;
    int ka = PyUnicode_KIND(a), kb = PyUnicode_KIND(b);
    const void *da = PyUnicode_DATA(a), *db = PyUnicode_DATA(b);
    for (Py_ssize_t j = 0; j < n; j++) {
        if (PyUnicode_READ(ka, da, j) != PyUnicode_READ(kb, db, j))
            return 0;
    }
    return 1;
}

/* 1 when every entry of f_edges is by nid (entry[2] == nid); with since (the repeat
 * case) only those after the entry equal to key count, and *found tells whether there
 * was one. -1 on an error, -2 on an entry of another shape. */
static int
all_by(PyObject *f_edges, PyObject *nid, PyObject *key, int *found)
{
    PyObject *it = PyObject_GetIter(f_edges), *entry;
    if (it == NULL)
        return -1;
    int rc = 1, since = 0;
    while (rc == 1 && (entry = PyIter_Next(it)) != NULL) {
        if (!PyTuple_CheckExact(entry) || PyTuple_GET_SIZE(entry) != 3) {
            rc = -2;
        } else if (key != NULL && !since) {
            int eq = PyObject_RichCompareBool(entry, key, Py_EQ);
            if (eq < 0)
                rc = -1;
            since = eq > 0;
        } else if (key != NULL && PyObject_RichCompareBool(entry, key, Py_EQ) != 0) {
            since = 1;  /* entry == key again (or an error: caught below) */
            if (PyErr_Occurred())
                rc = -1;
        } else {
            int ne = PyObject_RichCompareBool(PyTuple_GET_ITEM(entry, 2), nid, Py_NE);
            rc = ne < 0 ? -1 : !ne;
        }
        Py_DECREF(entry);
    }
    Py_DECREF(it);
    if (rc == 1 && PyErr_Occurred())
        rc = -1;
    if (found != NULL)
        *found = since;
    return rc;
}

static PyObject *
burst_redundant(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 7 || !PyDict_Check(args[2]) || !PyLong_Check(args[6])) {
        PyErr_SetString(PyExc_TypeError,
                        "burst_redundant(edges, f_edges, files: dict, prev, pnid, nid, lookback: int)");
        return NULL;
    }
    PyObject *edges = args[0], *f_edges = args[1], *files = args[2], *prev = args[3];
    PyObject *pnid = args[4], *nid = args[5];
    if (!PyUnicode_CheckExact(prev) || !PyUnicode_CheckExact(pnid) || !PyUnicode_CheckExact(nid))
        Py_RETURN_NONE;
    Py_ssize_t lookback = PyLong_AsSsize_t(args[6]);
    Py_ssize_t n = PySequence_Size(edges);
    if ((lookback == -1 || n < 0) && PyErr_Occurred())
        return NULL;
    Py_ssize_t plen = PyUnicode_GET_LENGTH(pnid);
    Py_ssize_t cut = PyUnicode_FindChar(pnid, '/', 0, plen, -1) + 1;
    if (cut == -1)  /* FindChar's -2: an error */
        return NULL;
    Py_ssize_t stop = n - 2 - lookback > -1 ? n - 2 - lookback : -1;
    PyObject *answer = Py_False;  /* borrowed; NULL on an error */
    for (Py_ssize_t i = n - 2; i > stop; i--) {
        PyObject *e = PySequence_GetItem(edges, i), *key = NULL;
        if (e == NULL)
            return NULL;
        int decided = 0;  /* 1: answer is set (the loop ends) */
        if (!PyTuple_CheckExact(e) || PyTuple_GET_SIZE(e) != 3 ||
            !PyUnicode_CheckExact(PyTuple_GET_ITEM(e, 1)) ||
            (PyTuple_GET_ITEM(e, 2) != Py_None && !PyUnicode_CheckExact(PyTuple_GET_ITEM(e, 2)))) {
            answer = Py_None;
            decided = 1;
            goto next;
        }
        PyObject *ts = PyTuple_GET_ITEM(e, 0), *eop = PyTuple_GET_ITEM(e, 1);
        PyObject *enid = PyTuple_GET_ITEM(e, 2);
        /* eop != prev or not enid: look further back */
        if (PyUnicode_Compare(eop, prev) != 0 || enid == Py_None || PyUnicode_GET_LENGTH(enid) == 0)
            goto next;
        key = PyTuple_Pack(3, ts, eop, nid);  /* (ts, eop, nid) */
        decided = 1;
        answer = NULL;
        if (key == NULL)
            goto next;
        int rc, since = 0;
        if (PyUnicode_Compare(enid, pnid) == 0) {  /* a repeat */
            rc = all_by(f_edges, nid, key, &since);
            answer = rc == -1 ? NULL : rc == -2 ? Py_None : rc && since ? Py_True : Py_False;
            goto next;
        }
        Py_ssize_t elen = PyUnicode_GET_LENGTH(enid);
        Py_ssize_t ecut = PyUnicode_FindChar(enid, '/', 0, elen, -1) + 1, slashes = 0;
        if (ecut == -1)
            goto next;
        for (Py_ssize_t j = 0; j < ecut; j++)
            slashes += PyUnicode_READ_CHAR(enid, j) == '/';
        if (!starts_with(pnid, enid, ecut) || !(ecut == cut || slashes > 2)) {
            decided = 0;
            goto next;
        }
        PyObject *path = PyUnicode_Substring(enid, 5, elen);
        if (path == NULL)
            goto next;
        PyObject *rep = PyDict_GetItemWithError(files, path);
        Py_XINCREF(rep);
        Py_DECREF(path);
        if (rep == NULL) {
            decided = PyErr_Occurred() != NULL;  /* else not retained: look further back */
            goto next;
        }
        PyObject *rep_edges = PyObject_GetAttr(rep, S_EDGES);
        Py_DECREF(rep);
        rc = rep_edges ? PySequence_Contains(rep_edges, key) : -1;
        Py_XDECREF(rep_edges);
        if (rc <= 0) {
            decided = rc < 0;  /* not retained: look further back */
            goto next;
        }
        rc = all_by(f_edges, nid, NULL, NULL);
        answer = rc == -1 ? NULL : rc == -2 ? Py_None : rc ? Py_True : Py_False;
    next:
        Py_XDECREF(key);
        Py_DECREF(e);
        if (decided) {
            if (answer == NULL)
                return NULL;
            return Py_NewRef(answer);
        }
        answer = Py_False;
    }
    Py_RETURN_FALSE;
}


static PyMethodDef methods[] = {
    {"generalise", (PyCFunction)generalise, METH_O,
     "generalise(path) -> detection.baseline's generalised path for an ASCII str, or None "
     "for any other argument."},
    {"count_pattern", (PyCFunction)(void (*)(void))count_pattern, METH_FASTCALL,
     "count_pattern(counts, dirty, pattern, auid, ts, half_life) -> the pattern's "
     "familiarity before, counted (BehaviourModel._count), or None, having changed "
     "nothing, for what Python must do."},
    {"burst_redundant", (PyCFunction)(void (*)(void))burst_redundant, METH_FASTCALL,
     "burst_redundant(edges, f_edges, files, prev, pnid, nid, lookback) -> "
     "ProvenanceGraph._burst_redundant's answer, or None for Python to decide."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "detection._fastedges",
    "The engine's per-edge steps in C (see detection.baseline and detection.graph).", -1,
    methods,
};

PyMODINIT_FUNC
PyInit__fastedges(void)
{
    S_EDGES = PyUnicode_InternFromString("edges");
    S_SEP = PyUnicode_InternFromString("\x1f");
    S_HOST = PyUnicode_InternFromString("h\x1f");
    USER_PREFIXES = PyDict_New();
    if (!S_SEP || !S_HOST || !S_EDGES || !USER_PREFIXES)
        return NULL;
    return PyModule_Create(&module);
}
